import { type ChildProcess, spawn } from 'node:child_process'
import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { chmod, cp, lchown, lstat, mkdtemp, readdir, readlink, realpath, rm, writeFile } from 'node:fs/promises'
import { availableParallelism, tmpdir } from 'node:os'
import { delimiter, dirname, join } from 'node:path'
import type { Writable } from 'node:stream'
import { fileURLToPath } from 'node:url'
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
>

/** Everything needed to spawn one kernel. */
export interface KernelCommand {
  command: string
  args: string[]
  env: Record<string, string>
  cwd: string
  /** Set when the server runs as root and spawn itself must drop to the kernel's user. */
  uid?: number
  gid?: number
  /**
   * bwrap options to write, NUL-separated, to descriptor SANDBOX_ARGS_FD of the child. The
   * sandbox's init shows its command line to the code inside; host paths stay out of it.
   */
  sandboxArgs?: string[]
}

const SANDBOX_ARGS_FD = 4

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

// Threads and processes of the server itself count against RLIMIT_NPROC when kernels share its uid.
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

/** The unprivileged uid a session's kernels run as when the server is root; undefined otherwise. */
export function kernelUid(sessionId: string): number | undefined {
  if (!runningAsRoot()) return undefined
  return KERNEL_UID_BASE + (createHash('sha256').update(sessionId).digest().readUInt32BE(0) % KERNEL_UID_SPAN)
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

/**
 * Files the kernels read but the server owns: a copy of the drivers (so an unprivileged kernel can
 * read them wherever the server is installed) and minimal passwd/group files per kernel uid.
 */
export class SandboxRuntime {
  private constructor(
    readonly dir: string,
    readonly layout: HostLayout,
  ) {}

  static async create(opts: SandboxOptions): Promise<SandboxRuntime> {
    const dir = await mkdtemp(join(tmpdir(), 'oi-kernels-'))
    await chmod(dir, 0o755)
    await cp(DRIVERS_SOURCE, join(dir, 'drivers'), { recursive: true })
    return new SandboxRuntime(dir, await hostLayout(opts))
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
    await rm(this.dir, { recursive: true, force: true })
  }
}

function kernelEnv(opts: SandboxOptions, path: string, home: string, extra: Record<string, string> = {}): Record<string, string> {
  // RLIMIT_NPROC counts threads, and BLAS libraries start one per CPU: on a large host numpy would
  // fail to load under the process limit. The tenant may still choose other values.
  const threads = String(Math.max(1, Math.min(availableParallelism(), Math.floor(opts.maxProcesses / 4))))
  // The tenant's variables cannot replace the ones the kernel relies on, which come last.
  return {
    OPENBLAS_NUM_THREADS: threads,
    OMP_NUM_THREADS: threads,
    ...extra,
    PATH: path,
    HOME: home,
    LANG: 'C.UTF-8',
    TERM: 'dumb',
    MPLBACKEND: 'Agg',
    MPLCONFIGDIR: join(home, '.cache', 'matplotlib'),
  }
}

function limitArgs(opts: SandboxOptions, language: Language): string[] {
  const mb = 1024 * 1024
  const processes = runningAsRoot() ? opts.maxProcesses : opts.maxProcesses * opts.maxKernels + SHARED_UID_HEADROOM
  const args = [`--nproc=${processes}`, `--fsize=${opts.maxFileMb * mb}`, `--nofile=${opts.maxOpenFiles}`]
  // V8 reserves far more address space than it uses and aborts at start under a small RLIMIT_AS;
  // node gets a heap limit instead (see interpreterArgs).
  if (language !== 'javascript') args.push(`--as=${opts.memoryMb * mb}`)
  return args
}

// Descriptors the server inherited from whatever started it (a supervisor's pipe, a terminal)
// must not reach kernel code: the launcher closes everything above the report channel.
const CLOSE_INHERITED = 'for fd in /proc/self/fd/*; do fd=${fd##*/}; ((fd > 3)) && eval "exec $fd>&-"; done; '

function interpreterArgs(opts: SandboxOptions, layout: HostLayout, language: Language, driversDir: string): string[] {
  const driver = join(driversDir, DRIVER_FILES[language])
  const bin = layout.interpreters[language]
  const launch = (script: string, command: string[]) => [layout.interpreters.shell, '--noprofile', '--norc', '-c', CLOSE_INHERITED + script, 'oi-kernel', ...command]
  switch (language) {
    case 'python':
      return launch('exec "$@"', [bin, '-u', driver])
    case 'shell':
      return launch('exec "$@"', [bin, '--noprofile', '--norc', driver])
    case 'javascript':
      // node cannot dup descriptors, so the launcher moves the command channel to fd 8 for it.
      // NODE_OPTIONS (a tenant variable, or one a test runner injects into every child) must not
      // preload code into the driver or change its flags.
      return launch('exec 8<&0 0</dev/null; unset NODE_OPTIONS; exec "$@"', [bin, `--max-old-space-size=${opts.memoryMb}`, driver])
  }
}

export interface KernelCommandRequest {
  language: Language
  /** The session's workspace on the host; it must exist and belong to `uid` when one is given. */
  workspace: string
  uid?: number
  env?: Record<string, string>
}

export async function buildKernelCommand(
  opts: SandboxOptions,
  runtime: SandboxRuntime,
  req: KernelCommandRequest,
): Promise<KernelCommand> {
  const driversDir = opts.sandbox === 'none' ? runtime.driversDir : SANDBOX_DRIVERS
  return wrap(opts, runtime, req, interpreterArgs(opts, runtime.layout, req.language, driversDir))
}

/** The command line that runs `inner` under the resource limits and, unless disabled, in bubblewrap. */
async function wrap(opts: SandboxOptions, runtime: SandboxRuntime, req: KernelCommandRequest, inner: string[]): Promise<KernelCommand> {
  const { layout } = runtime
  const limits = [...limitArgs(opts, req.language), '--']
  const prlimit = requireExecutable('prlimit')
  if (opts.sandbox === 'none') {
    return {
      command: prlimit,
      args: [...limits, ...inner],
      env: kernelEnv(opts, layout.path, req.workspace, req.env),
      cwd: req.workspace,
      ...(req.uid === undefined ? {} : { uid: req.uid, gid: req.uid }),
    }
  }
  const options = [...(await namespaceArgs(opts, runtime, req.uid)), '--bind', req.workspace, SANDBOX_WORKSPACE, '--chdir', SANDBOX_WORKSPACE]
  const args = [
    ...limits,
    requireExecutable('bwrap'),
    '--args',
    String(SANDBOX_ARGS_FD),
    '--',
    ...dropPrivileges(req.uid),
    // bwrap's own init leads the sandbox's session; the driver needs a process group of its own
    // so an interrupt reaches it and the commands it runs, and nothing else.
    systemTool('setsid'),
    ...inner,
  ]
  // The environment goes through spawn, not `--setenv`: arguments are world-readable in
  // /proc/PID/cmdline and the tenant's secrets are part of it. spawn's env replaces the
  // server's, so nothing of the server's own environment reaches the kernel.
  return { command: prlimit, args, sandboxArgs: options, env: kernelEnv(opts, layout.path, SANDBOX_WORKSPACE, req.env), cwd: req.workspace }
}

/**
 * As root, bwrap sets up the namespaces itself (a user namespace would map the kernel back to
 * uid 0, which RLIMIT_NPROC never limits) and `setpriv` then drops to the session's uid with no
 * capabilities. Without root, bwrap builds a user namespace and no nested one is allowed inside.
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
          // Only to enter the workspace, which belongs to the kernel's uid, before setpriv drops everything.
          '--cap-add',
          'CAP_DAC_READ_SEARCH',
        ]
  const accounts = await runtime.accountFiles(uid ?? process.getuid?.() ?? 1000, uid ?? process.getgid?.() ?? 1000)
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
    '--tmpfs',
    '/tmp',
    '--perms',
    '1777',
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
    const uid = kernelUid('sandbox-check')
    if (uid !== undefined) await chownWorkspace(workspace, uid)
    const probe = [runtime.layout.interpreters.shell, '--noprofile', '--norc', '-c', 'test -w .']
    const spec = await wrap(opts, runtime, { language: 'shell', workspace, uid }, probe)
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
 * Spawns a kernel command in a process group of its own, feeding the sandbox options on their
 * descriptor. `stdio` covers the first descriptors; SANDBOX_ARGS_FD is added when needed.
 */
export function spawnKernelCommand(spec: KernelCommand, stdio: ('pipe' | 'ignore')[]): ChildProcess {
  const child = spawn(spec.command, spec.args, {
    cwd: spec.cwd,
    env: spec.env,
    uid: spec.uid,
    gid: spec.gid,
    // Its own process group, so one signal reaches the kernel and everything it started.
    detached: true,
    stdio: spec.sandboxArgs ? [...stdio, ...Array(SANDBOX_ARGS_FD - stdio.length).fill('ignore'), 'pipe'] : stdio,
  })
  const options = child.stdio[SANDBOX_ARGS_FD] as Writable | null | undefined
  if (spec.sandboxArgs && options) {
    options.on('error', () => {})
    options.end(spec.sandboxArgs.map((arg) => `${arg}\0`).join(''))
  }
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
