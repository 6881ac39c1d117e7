import { type ChildProcess, execFile, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { chmod, cp, lchown, lstat, mkdtemp, readdir, readlink, realpath, rm, writeFile } from 'node:fs/promises'
import { availableParallelism, tmpdir } from 'node:os'
import { basename, delimiter, dirname, join } from 'node:path'
import type { Writable } from 'node:stream'
import { fileURLToPath } from 'node:url'
import { type CgroupEnforcement, Cgroups, type KernelCgroup, processAlive, processTag } from './cgroups.js'
import { tenantVariables } from './environment.js'
import type { KernelManagerOptions, Language } from './types.js'

export type SandboxOptions = Pick<
  KernelManagerOptions,
  | 'sandbox'
  | 'sandboxNetwork'
  | 'pythonBin'
  | 'nodeBin'
  | 'bashBin'
  | 'maxKernels'
  | 'memoryMb'
  | 'maxProcesses'
  | 'maxFileMb'
  | 'maxOpenFiles'
  | 'tmpfsMb'
>

/**
 * Everything needed to spawn one kernel. The processes that run before the drop to the kernel's
 * user (the cgroup join, prlimit, bwrap, setpriv) get `env`, a fixed environment with nothing of
 * the tenant's or the server's; the kernel's own variables travel on a descriptor and are applied
 * by the launcher, inside the sandbox, after the drop.
 */
export interface KernelCommand {
  command: string
  args: string[]
  env: Record<string, string>
  cwd: string
  /**
   * bwrap options to write, NUL-separated, to descriptor SANDBOX_ARGS_FD of the child. The
   * sandbox's init shows its command line to the code inside; host paths stay out of it.
   */
  sandboxArgs?: string[]
  /** The kernel's environment, `NAME=value` entries written NUL-separated to KERNEL_ENV_FD. */
  kernelEnv: [string, string][]
  /** A BPF program for `bwrap --seccomp`, written to SECCOMP_FD. */
  seccomp?: Buffer
}

// Descriptor layout of a spawned kernel: 0-2 stdio (stdin carries commands), 3 reports, then
// what the helpers read before the kernel starts.
const SANDBOX_ARGS_FD = 4
const KERNEL_ENV_FD = 5
const SECCOMP_FD = 6

/** The whole environment of every process that runs before the drop to the kernel's user. */
const HELPER_ENV = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8' }
/** Debian's interpreter, which has the libseccomp binding (python3-seccomp). */
const SECCOMP_PYTHON = '/usr/bin/python3'
const SECCOMP_GENERATOR = fileURLToPath(new URL('./seccomp_filter.py', import.meta.url))
const RUNTIME_PREFIX = 'oi-kernels-'

const DRIVERS_SOURCE = fileURLToPath(new URL('./drivers/', import.meta.url))
const DRIVER_FILES: Record<Language, string> = {
  python: 'python_driver.py',
  shell: 'shell_driver.sh',
  javascript: 'node_driver.mjs',
}
/** Where the drivers appear inside the bubblewrap sandbox. */
const SANDBOX_DRIVERS = '/opt/oi'
const SANDBOX_DRIVERS_PARENT = dirname(SANDBOX_DRIVERS)
const SANDBOX_WORKSPACE = '/workspace'
const BASE_PATH = ['/usr/local/bin', '/usr/bin', '/bin']

// A range of uids no distribution hands out to people or services; each session gets its own so
// that RLIMIT_NPROC (counted per uid) caps one session without starving the others.
const KERNEL_UID_BASE = 1_600_000_000
const KERNEL_UID_SPAN = 1 << 24

// Without root every kernel has the server's uid: RLIMIT_NPROC, counted per uid, is then set high
// enough for all of them and the server (the server's own threads count too) on the host side, and
// lowered to the kernel's own limit by the launcher inside the kernel's user namespace, where the
// kernel counts its processes apart from every other (Linux 5.14+ counts per namespace and uid).
const SHARED_UID_HEADROOM = 256

// The few /etc files programs need; /etc/ssl/private and the host's accounts stay out.
const ETC_ENTRIES = [
  'ld.so.cache',
  'ld.so.conf',
  'ld.so.conf.d',
  'alternatives',
  'ssl/certs',
  'ssl/openssl.cnf',
  'localtime',
  'timezone',
  'nsswitch.conf',
  'matplotlibrc',
  'fonts',
  'mime.types',
]
const ETC_NETWORK_ENTRIES = ['resolv.conf', 'hosts', 'host.conf', 'gai.conf', 'services', 'protocols']
const ROOT_LINKS = ['bin', 'sbin', 'lib', 'lib32', 'lib64', 'libx32']

const runningAsRoot = () => process.getuid?.() === 0

/**
 * Hands out the unprivileged uids kernels run as when the server is root (undefined otherwise):
 * one per session with live kernels, never the same for two of them, so that no per-uid limit
 * (RLIMIT_NPROC) or ownership ties two sessions together. A session's uid is derived from its id
 * and probed onwards on a clash, so it is usually the same from one kernel start to the next and
 * its workspace need not change owner.
 */
export class UidAllocator {
  private readonly bySession = new Map<string, number>()
  private readonly taken = new Set<number>()

  acquire(sessionId: string): number | undefined {
    if (!runningAsRoot()) return undefined
    let uid = this.bySession.get(sessionId)
    if (uid !== undefined) return uid
    let slot = createHash('sha256').update(sessionId).digest().readUInt32BE(0) % KERNEL_UID_SPAN
    while (this.taken.has(KERNEL_UID_BASE + slot)) slot = (slot + 1) % KERNEL_UID_SPAN
    uid = KERNEL_UID_BASE + slot
    this.bySession.set(sessionId, uid)
    this.taken.add(uid)
    return uid
  }

  /** The session has no live kernel left: its uid may go to another session. */
  release(sessionId: string): void {
    const uid = this.bySession.get(sessionId)
    if (uid === undefined) return
    this.bySession.delete(sessionId)
    this.taken.delete(uid)
  }

  uidOf(sessionId: string): number | undefined {
    return this.bySession.get(sessionId)
  }
}

function findExecutable(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/bin', '/bin', '/usr/sbin']
  for (const dir of dirs) {
    if (!dir) continue
    const candidate = join(dir, name)
    if (existsSync(candidate)) return candidate
  }
  return undefined
}

function requireExecutable(name: string): string {
  const found = findExecutable(name)
  if (!found) throw new Error(`${name} is not installed`)
  return found
}

interface HostLayout {
  interpreters: Record<Language, string>
  /** bwrap arguments that rebuild the host's read-only system view. */
  systemArgs: string[]
  path: string
}

async function hostLayout(opts: SandboxOptions): Promise<HostLayout> {
  const binaries: Record<Language, string> = { python: opts.pythonBin, shell: opts.bashBin, javascript: opts.nodeBin }
  const interpreters = {} as Record<Language, string>
  const extraDirs = new Set<string>()
  const systemArgs = ['--ro-bind', '/usr', '/usr']
  for (const [language, bin] of Object.entries(binaries) as [Language, string][]) {
    const located = bin.includes('/') ? bin : (findExecutable(bin) ?? bin)
    const real = await realpath(located).catch(() => located)
    interpreters[language] = real
    // An interpreter installed outside /usr (pyenv, /opt) needs its whole prefix for its libraries.
    if (!real.startsWith('/usr/')) extraDirs.add(dirname(dirname(real)))
  }
  for (const name of ROOT_LINKS) {
    const path = `/${name}`
    const stat = await lstat(path).catch(() => undefined)
    if (stat?.isSymbolicLink()) systemArgs.push('--symlink', await readlink(path), path)
    else if (stat?.isDirectory()) systemArgs.push('--ro-bind', path, path)
  }
  for (const dir of extraDirs) systemArgs.push('--ro-bind', dir, dir)
  const etc = [...ETC_ENTRIES, ...(opts.sandboxNetwork ? ETC_NETWORK_ENTRIES : [])]
  const pythonConfig = (await readdir('/etc').catch(() => [] as string[])).filter((name) => /^python3(\.\d+)?$/.test(name))
  // bwrap running as root creates missing parents of mount points as 0700, which the kernel's
  // user could not enter.
  for (const dir of ['/etc', '/etc/ssl', SANDBOX_DRIVERS_PARENT]) systemArgs.push('--perms', '0755', '--dir', dir)
  for (const name of [...etc, ...pythonConfig]) systemArgs.push('--ro-bind-try', `/etc/${name}`, `/etc/${name}`)
  const path = [...new Set([...[...extraDirs].map((dir) => join(dir, 'bin')), ...BASE_PATH])].join(':')
  return { interpreters, systemArgs, path }
}

/** What protects the kernels on this host, for the start-up log and the readiness report. */
export interface SandboxEnforcement {
  sandbox: 'bwrap' | 'none'
  /** The seccomp filter is loaded into every sandboxed kernel. */
  seccomp: boolean
  seccompReason?: string
  cgroups: CgroupEnforcement
  /** Size of the sandbox's /tmp and /dev/shm, each (MiB). */
  tmpfsMb: number
  /** Per-process limits, always set through prlimit. */
  rlimits: string[]
}

/**
 * Files the kernels read but the server owns: a copy of the drivers (so an unprivileged kernel can
 * read them wherever the server is installed), minimal passwd/group files per kernel uid and the
 * seccomp filter. Lives in `${TMPDIR}/oi-kernels-<pid>-<start time>-XXXXXX`; directories of
 * servers that are gone (killed without a chance to clean up) are removed when the next starts.
 */
export class SandboxRuntime {
  private constructor(
    readonly dir: string,
    readonly layout: HostLayout,
    readonly cgroups: Cgroups,
    readonly enforcement: SandboxEnforcement,
    /** The BPF program for `bwrap --seccomp`, when libseccomp could make one. */
    readonly seccompFilter: Buffer | undefined,
  ) {}

  static async create(opts: SandboxOptions, log?: { warn(obj: object, msg?: string): void }): Promise<SandboxRuntime> {
    await removeStaleRuntimes(log)
    const dir = await mkdtemp(join(tmpdir(), `${RUNTIME_PREFIX}${processTag(process.pid) ?? process.pid}-`))
    await chmod(dir, 0o755)
    await cp(DRIVERS_SOURCE, join(dir, 'drivers'), { recursive: true })
    const [layout, cgroups, seccomp] = await Promise.all([hostLayout(opts), Cgroups.detect(log), opts.sandbox === 'bwrap' ? seccompFilter() : undefined])
    const enforcement: SandboxEnforcement = {
      sandbox: opts.sandbox,
      seccomp: seccomp instanceof Buffer,
      ...(typeof seccomp === 'string' ? { seccompReason: seccomp } : {}),
      cgroups: cgroups.enforcement,
      tmpfsMb: opts.tmpfsMb,
      rlimits: ['nproc', 'fsize', 'nofile', 'as (not for JavaScript: a V8 heap limit instead)'],
    }
    return new SandboxRuntime(dir, layout, cgroups, enforcement, seccomp instanceof Buffer ? seccomp : undefined)
  }

  get driversDir(): string {
    return join(this.dir, 'drivers')
  }

  /** passwd and group files naming the kernel's user, so `whoami` and `os.userInfo()` work. */
  async accountFiles(uid: number, gid: number): Promise<{ passwd: string; group: string }> {
    const passwd = join(this.dir, `passwd-${uid}`)
    const group = join(this.dir, `group-${uid}`)
    if (!existsSync(passwd)) {
      await writeFile(group, `root:x:0:\nuser:x:${gid}:\nnogroup:x:65534:\n`, { mode: 0o644 })
      await writeFile(passwd, `root:x:0:0:root:/root:/usr/sbin/nologin\nuser:x:${uid}:${gid}:user:${SANDBOX_WORKSPACE}:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n`, { mode: 0o644 })
    }
    return { passwd, group }
  }

  async close(): Promise<void> {
    await this.cgroups.close()
    await rm(this.dir, { recursive: true, force: true })
  }
}

async function removeStaleRuntimes(log?: { warn(obj: object, msg?: string): void }): Promise<void> {
  for (const name of await readdir(tmpdir()).catch(() => [] as string[])) {
    const tag = /^oi-kernels-(\d+-\d+)-/.exec(name)?.[1]
    if (!tag || processAlive(tag)) continue
    await rm(join(tmpdir(), name), { recursive: true, force: true }).catch((err) => log?.warn({ err, dir: name }, 'stale kernel runtime directory not removed'))
  }
}

/** The BPF program, or why there is none. */
function seccompFilter(): Promise<Buffer | string> {
  if (!existsSync(SECCOMP_PYTHON)) return Promise.resolve(`${SECCOMP_PYTHON} is missing (install python3 and python3-seccomp)`)
  return new Promise((resolve) => {
    execFile(SECCOMP_PYTHON, ['-I', SECCOMP_GENERATOR], { env: HELPER_ENV, encoding: 'buffer', timeout: 30_000 }, (err, stdout, stderr) => {
      if (!err && stdout.length > 0 && stdout.length % 8 === 0) return resolve(stdout)
      const reason = stderr.toString('utf8').trim().split('\n').pop() || err?.message || 'no filter generated'
      resolve(/No module named 'seccomp'/.test(reason) ? 'python3-seccomp is not installed' : reason)
    })
  })
}

/** The kernel's variables: thread defaults, then the tenant's, then those the kernel relies on. */
function kernelEnv(opts: SandboxOptions, path: string, home: string, tenant: Record<string, string> | undefined): [string, string][] {
  // RLIMIT_NPROC counts threads, and BLAS libraries start one per CPU: on a large host numpy would
  // fail to load under the process limit. The tenant may still choose other values.
  const threads = String(Math.max(1, Math.min(availableParallelism(), Math.floor(opts.maxProcesses / 4))))
  return [
    ['OPENBLAS_NUM_THREADS', threads],
    ['OMP_NUM_THREADS', threads],
    ...tenantVariables(tenant),
    ['PATH', path],
    ['HOME', home],
    ['LANG', 'C.UTF-8'],
    ['TERM', 'dumb'],
    ['MPLBACKEND', 'Agg'],
    ['MPLCONFIGDIR', join(home, '.cache', 'matplotlib')],
  ]
}

function limitArgs(opts: SandboxOptions, language: Language | undefined): string[] {
  const mb = 1024 * 1024
  const processes = runningAsRoot() ? opts.maxProcesses : opts.maxProcesses * opts.maxKernels + SHARED_UID_HEADROOM
  const args = [`--nproc=${processes}`, `--fsize=${opts.maxFileMb * mb}`, `--nofile=${opts.maxOpenFiles}`]
  // V8 reserves far more address space than it uses and aborts at start under a small RLIMIT_AS;
  // node gets a heap limit instead (see interpreterArgs).
  if (language !== 'javascript') args.push(`--as=${opts.memoryMb * mb}`)
  return args
}

/**
 * The launcher: the first program that runs as the kernel's user. It drops the helpers'
 * environment and exports the kernel's variables read from KERNEL_ENV_FD (none of them was seen
 * by anything before it), closes every
 * descriptor above the report channel (the helpers' and whatever started the server), moves the
 * command channel from stdin to fd 8 with /dev/null as stdin, enters the workspace and execs the
 * interpreter. Readonly shell variables cannot be exported and are skipped.
 *
 * Node cannot make a descriptor close-on-exec, only open a new one, and /proc/self/fd/N reopens
 * a pipe but not the socket pair spawn makes: for JavaScript both channels are relayed through
 * pipes (a `cat` each, deaf to interrupts), which the driver reopens and closes so the programs
 * it starts get neither. Its stdout and stderr are relayed too, so that the driver can reopen
 * them for its end-of-execution sentinels, out of reach of code that closes fds 1 and 2.
 */
function launcher(shell: string, workspace: string | undefined, language: Language | undefined, processLimit: number | undefined, command: string[]): string[] {
  const script = [
    ...(processLimit === undefined ? [] : [`ulimit -u ${processLimit} || exit 126`]),
    'for v in $(compgen -e); do unset -v "$v" 2>/dev/null; done',
    `while IFS= read -r -d '' v; do export -- "$v" 2>/dev/null; done <&${KERNEL_ENV_FD}`,
    'for fd in /proc/self/fd/*; do fd=${fd##*/}; ((fd > 3)) && eval "exec $fd>&-"; done',
    'exec 8<&0 0</dev/null',
    ...(language === 'javascript'
      ? ["exec 3> >(trap '' INT; exec cat >&3) 8< <(trap '' INT; exec cat <&8)", "exec 2> >(trap '' INT; exec cat >&2)", "exec 1> >(trap '' INT; exec cat 2>/dev/null)"]
      : []),
    ...(workspace ? [`cd ${workspace} || exit 126`] : []),
    'exec "$@"',
  ].join('; ')
  return [shell, '--noprofile', '--norc', '-c', script, 'oi-kernel', ...command]
}

function interpreterArgs(opts: SandboxOptions, layout: HostLayout, language: Language, driversDir: string): string[] {
  const driver = join(driversDir, DRIVER_FILES[language])
  const bin = layout.interpreters[language]
  switch (language) {
    case 'python':
      return [bin, '-u', driver]
    case 'shell':
      return [bin, '--noprofile', '--norc', driver]
    case 'javascript':
      // The driver keeps Node's SIGINT watchdog running, which only an internal binding can do.
      return [bin, '--expose-internals', `--max-old-space-size=${opts.memoryMb}`, driver]
  }
}

export interface KernelCommandRequest {
  language: Language
  /** The session's workspace on the host; it must exist and belong to `uid` when one is given. */
  workspace: string
  uid?: number
  /** The tenant's variables; names a tenant may not set are left out (see environment.ts). */
  env?: Record<string, string>
  /** The kernel's control group, which its first process joins before anything else runs. */
  cgroup?: KernelCgroup
}

export async function buildKernelCommand(
  opts: SandboxOptions,
  runtime: SandboxRuntime,
  req: KernelCommandRequest,
): Promise<KernelCommand> {
  const driversDir = opts.sandbox === 'none' ? runtime.driversDir : SANDBOX_DRIVERS
  return wrap(opts, runtime, req, req.language, interpreterArgs(opts, runtime.layout, req.language, driversDir))
}

// Joins the control groups named before `--` (as root, before the sandbox exists), then execs the rest.
const JOIN_CGROUPS = 'for f; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; exec "$@"'

/** The command line that runs `inner` under the resource limits and, unless disabled, in bubblewrap. */
async function wrap(opts: SandboxOptions, runtime: SandboxRuntime, req: Omit<KernelCommandRequest, 'language'>, language: Language | undefined, inner: string[]): Promise<KernelCommand> {
  const { layout } = runtime
  const limited = [requireExecutable('prlimit'), ...limitArgs(opts, language), '--']
  const joined = (command: string[]) => (req.cgroup ? ['/bin/sh', '-c', JOIN_CGROUPS, 'oi-cgroup', ...req.cgroup.procsFiles, '--', ...command] : command)
  if (opts.sandbox === 'none') {
    const [command, ...args] = joined([...dropPrivileges(req.uid), ...limited, ...launcher(layout.interpreters.shell, undefined, language, undefined, inner)])
    return { command: command!, args, env: HELPER_ENV, kernelEnv: kernelEnv(opts, layout.path, req.workspace, req.env), cwd: req.workspace }
  }
  const seccomp = runtime.seccompFilter
  const options = [
    ...(await namespaceArgs(opts, runtime, req.uid)),
    ...(seccomp ? ['--seccomp', String(SECCOMP_FD)] : []),
    '--bind',
    req.workspace,
    SANDBOX_WORKSPACE,
  ]
  const [command, ...args] = joined([
    ...limited,
    requireExecutable('bwrap'),
    '--args',
    String(SANDBOX_ARGS_FD),
    '--',
    ...dropPrivileges(req.uid),
    // bwrap's own init leads the sandbox's session; the driver needs a process group of its own
    // so an interrupt reaches it and the commands it runs, and nothing else.
    systemTool('setsid'),
    ...launcher(layout.interpreters.shell, SANDBOX_WORKSPACE, language, req.uid === undefined ? opts.maxProcesses : undefined, inner),
  ])
  // Variables never travel as arguments either: those are world-readable in /proc/PID/cmdline.
  return {
    command: command!,
    args,
    sandboxArgs: options,
    seccomp,
    env: HELPER_ENV,
    kernelEnv: kernelEnv(opts, layout.path, SANDBOX_WORKSPACE, req.env),
    // The host side runs there too, which tells a session's processes apart in /proc.
    cwd: req.workspace,
  }
}

/**
 * As root, bwrap sets up the namespaces itself (a user namespace would map the kernel back to
 * uid 0, which RLIMIT_NPROC never limits) and `setpriv` then drops to the session's uid with no
 * capabilities; nothing of the tenant's reaches either before that. Without root, bwrap builds a
 * user namespace and no nested one is allowed inside. /tmp and /dev/shm are sized tmpfs mounts.
 */
async function namespaceArgs(opts: SandboxOptions, runtime: SandboxRuntime, uid: number | undefined): Promise<string[]> {
  const network = opts.sandboxNetwork ? [] : ['--unshare-net']
  const namespaces =
    uid === undefined
      ? ['--unshare-all', ...(opts.sandboxNetwork ? ['--share-net'] : []), '--unshare-user', '--disable-userns', '--cap-drop', 'ALL']
      : [
          '--unshare-ipc',
          '--unshare-pid',
          '--unshare-uts',
          '--unshare-cgroup-try',
          ...network,
          '--cap-drop',
          'ALL',
          '--cap-add',
          'CAP_SETUID',
          '--cap-add',
          'CAP_SETGID',
          '--cap-add',
          'CAP_SETPCAP',
        ]
  const accounts = await runtime.accountFiles(uid ?? process.getuid?.() ?? 1000, uid ?? process.getgid?.() ?? 1000)
  const tmpfsBytes = String(opts.tmpfsMb * 1024 * 1024)
  return [
    ...namespaces,
    '--die-with-parent',
    '--new-session',
    '--hostname',
    'sandbox',
    ...runtime.layout.systemArgs,
    '--ro-bind',
    accounts.passwd,
    '/etc/passwd',
    '--ro-bind',
    accounts.group,
    '/etc/group',
    '--ro-bind',
    runtime.driversDir,
    SANDBOX_DRIVERS,
    '--proc',
    '/proc',
    '--dev',
    '/dev',
    '--perms',
    '1777',
    '--size',
    tmpfsBytes,
    '--tmpfs',
    '/tmp',
    '--perms',
    '1777',
    '--size',
    tmpfsBytes,
    '--tmpfs',
    '/dev/shm',
  ]
}

function dropPrivileges(uid: number | undefined): string[] {
  if (uid === undefined) return []
  const id = String(uid)
  return [systemTool('setpriv'), '--reuid', id, '--regid', id, '--clear-groups', '--bounding-set=-all', '--inh-caps=-all', '--no-new-privs', '--']
}

/** A util-linux program that runs inside the sandbox, where only /usr is visible. */
function systemTool(name: string): string {
  for (const dir of ['/usr/bin', '/usr/sbin']) if (existsSync(join(dir, name))) return join(dir, name)
  throw new Error(`${name} (util-linux) is not installed`)
}

/** Starts a throwaway sandbox exactly as a kernel would be started, with a probe for a program. */
export async function checkSandbox(opts: SandboxOptions): Promise<{ ok: boolean; reason?: string }> {
  let runtime: SandboxRuntime | undefined
  let workspace: string | undefined
  try {
    runtime = await SandboxRuntime.create(opts)
    workspace = await mkdtemp(join(tmpdir(), 'oi-sandbox-check-'))
    const uid = new UidAllocator().acquire(`sandbox-check-${basename(workspace)}`)
    if (uid !== undefined) await chownWorkspace(workspace, uid)
    const probe = [runtime.layout.interpreters.shell, '--noprofile', '--norc', '-c', 'test -w .']
    const spec = await wrap(opts, runtime, { workspace, uid }, undefined, probe)
    const child = spawnKernelCommand(spec, ['ignore', 'ignore', 'pipe'])
    let stderr = ''
    child.stderr?.on('data', (chunk: Buffer) => {
      stderr += chunk.toString('utf8')
    })
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000)
    const [code, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null]
    clearTimeout(timer)
    if (code === 0) return { ok: true }
    return { ok: false, reason: stderr.trim() || `the probe failed (exit code ${code}, signal ${signal})` }
  } catch (err) {
    return { ok: false, reason: (err as Error).message }
  } finally {
    if (workspace) await rm(workspace, { recursive: true, force: true })
    await runtime?.close()
  }
}

/**
 * Spawns a kernel command in a process group of its own and feeds the helpers' descriptors: the
 * sandbox options, the kernel's environment and the seccomp filter. `stdio` covers the first
 * descriptors (up to the report channel).
 */
export function spawnKernelCommand(spec: KernelCommand, stdio: ('pipe' | 'ignore')[]): ChildProcess {
  const layout: ('pipe' | 'ignore')[] = [...stdio, ...Array<'ignore'>(SANDBOX_ARGS_FD - stdio.length).fill('ignore')]
  layout[SANDBOX_ARGS_FD] = spec.sandboxArgs ? 'pipe' : 'ignore'
  layout[KERNEL_ENV_FD] = 'pipe'
  layout[SECCOMP_FD] = spec.seccomp ? 'pipe' : 'ignore'
  const child = spawn(spec.command, spec.args, {
    cwd: spec.cwd,
    env: spec.env,
    // Its own process group, so one signal reaches the kernel and everything it started.
    detached: true,
    stdio: layout,
  })
  const feed = (fd: number, data: Buffer | string | undefined) => {
    const pipe = child.stdio[fd] as Writable | null | undefined
    if (data === undefined || !pipe) return
    pipe.on('error', () => {})
    pipe.end(data)
  }
  feed(SANDBOX_ARGS_FD, spec.sandboxArgs?.map((arg) => `${arg}\0`).join(''))
  feed(KERNEL_ENV_FD, spec.kernelEnv.map(([name, value]) => `${name}=${value}\0`).join(''))
  feed(SECCOMP_FD, spec.seccomp)
  return child
}

/**
 * Hands a workspace tree to the kernel's uid, without following symlinks. Called only while the
 * workspace still belongs to root, before any kernel of the session could change it underneath.
 */
export async function chownWorkspace(dir: string, uid: number): Promise<void> {
  await lchown(dir, uid, uid)
  if (!(await lstat(dir)).isDirectory()) return
  for (const entry of await readdir(dir)) await chownWorkspace(join(dir, entry), uid)
}
