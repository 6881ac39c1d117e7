import { execFileSync, spawn } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { KernelManager } from '../../services/kernels/manager.js'
import { descendants } from '../../services/kernels/processes.js'
import type { ExecResult, KernelManagerOptions, KernelOutput, Language } from '../../services/kernels/types.js'

// Set before any kernel starts: it must never reach one.
const MARKER = `escape-marker-${process.pid}`
process.env.OI_ESCAPE_MARKER = MARKER

const dataDir = mkdtempSync(join(tmpdir(), 'oi-escape-data-'))
t.teardown(() => rmSync(dataDir, { recursive: true, force: true }))
writeFileSync(join(dataDir, 'oi-server.db'), `database ${MARKER}`)
writeFileSync(join(dataDir, '.env'), `LLM_API_KEY=${MARKER}`)
const workspacesDir = join(dataDir, 'workspaces')

const MAX_PROCESSES = 48
const options: KernelManagerOptions = {
  workspacesDir,
  sandbox: 'bwrap',
  sandboxNetwork: false,
  pythonBin: '/usr/bin/python3',
  nodeBin: process.execPath,
  bashBin: '/bin/bash',
  idleSeconds: 600,
  maxKernels: 20,
  maxKernelsPerTenant: 20,
  execTimeoutMs: 20_000,
  execGraceMs: 1_000,
  outputLimitBytes: 1_000_000,
  memoryMb: 1024,
  maxProcesses: MAX_PROCESSES,
  maxFileMb: 16,
  maxOpenFiles: 256,
  tmpfsMb: 64,
  workspaceQuota: { maxBytes: 48 * 1024 * 1024, maxFiles: 500 },
}
const manager = new KernelManager(options)
t.teardown(() => manager.close())

// tap's process tracker adds its own variables to every process the test spawns, kernels
// included; they are the test harness's, not the server's, and are left out of the checks.
const WITHOUT_TAP = 'import os\nTAP = ("_TAPJS_PROCESSINFO_", "NODE_OPTIONS")\ndef without_tap(text):\n    return "\\0".join(e for e in text.split("\\0") if not e.startswith(TAP))\n'

let sessions = 0
const newSession = () => `escape-${process.pid}-${++sessions}`

async function run(sessionId: string, language: Language, code: string, timeoutMs?: number, env?: Record<string, string>): Promise<{ result: ExecResult; out: string }> {
  const outputs: KernelOutput[] = []
  const result = await manager.execute({ sessionId, tenantId: 'tenant', language, code, timeoutMs, env, onOutput: (o) => outputs.push(o) })
  const out = outputs.map((o) => (o.type === 'image' || o.type === 'active_line' ? '' : o.text)).join('')
  return { result, out }
}

/** Host processes running as a uid, for counting what a bomb managed to start. */
function processesOf(uid: number): number {
  let count = 0
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try {
      const status = readFileSync(`/proc/${name}/status`, 'utf8')
      if (new RegExp(`^Uid:\\s+${uid}\\s`, 'm').test(status) && !/^State:\s+Z/m.test(status)) count++
    } catch {
      // Gone meanwhile.
    }
  }
  return count
}

t.test('the server data dir and other workspaces are out of sight', async (t) => {
  const a = newSession()
  const b = newSession()
  await run(a, 'shell', `echo ${MARKER} > a-secret.txt`)
  const probes = [join(dataDir, 'oi-server.db'), join(dataDir, '.env'), join(workspacesDir, a, 'a-secret.txt'), `/workspace/../${a}/a-secret.txt`]
  const py = await run(
    b,
    'python',
    `import os\nfor path in ${JSON.stringify(probes)}:\n    try:\n        print(path, open(path).read())\n    except OSError as e:\n        print(path, type(e).__name__)\nprint(sorted(os.listdir("/")))\nprint(os.path.exists(${JSON.stringify(workspacesDir)}))`,
  )
  t.notMatch(py.out, MARKER)
  t.match(py.out, /FileNotFoundError/)
  t.match(py.out, /\['bin', 'dev', 'etc', 'lib', 'lib64', 'opt', 'proc', 'sbin', 'tmp', 'usr', 'workspace'\]/)
  t.match(py.out, /False\n$/)
  const sh = await run(b, 'shell', `cat ${probes.join(' ')} 2>&1`)
  t.notMatch(sh.out, MARKER)
  const look = await run(b, 'shell', "ls -a /workspace/..; find / -path /proc -prune -o -path /usr -prune -o -name 'a-secret.txt' -print 2>/dev/null")
  t.notMatch(look.out, a)
  const own = await run(a, 'shell', 'cat a-secret.txt')
  t.equal(own.out, `${MARKER}\n`, 'a session still reads its own files')
})

t.test("the server's environment and processes are out of sight", async (t) => {
  const id = newSession()
  const py = await run(
    id,
    'python',
    `${WITHOUT_TAP}seen = {k: v for k, v in os.environ.items() if not k.startswith(TAP)}\nfor pid in [p for p in os.listdir("/proc") if p.isdigit()]:\n    for name in ("environ", "cmdline"):\n        try:\n            seen[pid + name] = without_tap(open(f"/proc/{pid}/{name}", "rb").read().decode("latin1"))\n        except OSError as e:\n            seen[pid + name] = type(e).__name__\nprint(repr(seen))\nprint("pids", len([p for p in os.listdir("/proc") if p.isdigit()]), "ppid", os.getppid())`,
  )
  t.notMatch(py.out, MARKER)
  t.notMatch(py.out, /OI_ESCAPE_MARKER|node_modules|kernels-escape/)
  t.notMatch(py.out, dataDir, "host paths stay out of the sandbox init's command line")
  // Without root the sandbox's init is the server's uid in the kernel's user namespace; its
  // environment is then the helpers' fixed one, checked above to hold nothing of the server's.
  if (process.getuid?.() === 0) t.match(py.out, /'1environ': 'PermissionError'/, "the sandbox's init is not readable")
  t.match(py.out, /pids [1-5] ppid 1\n/, 'only the sandbox processes are visible')
  const sh = await run(id, 'shell', 'env | grep -v -e ^_TAPJS_PROCESSINFO_ -e ^NODE_OPTIONS=; id -u; grep CapEff /proc/self/status; touch /usr/x 2>&1; cat /etc/shadow 2>&1')
  t.notMatch(sh.out, MARKER)
  t.match(sh.out, /CapEff:\s+0+\n/, 'no capabilities')
  t.match(sh.out, /Read-only file system/)
  t.match(sh.out, /No such file or directory/)
  t.notMatch(sh.out, /^0$/m, 'not root')
  const js = await run(id, 'javascript', 'Object.keys(process.env).join(",")')
  t.notMatch(js.out, /OI_ESCAPE_MARKER/)
})

t.test('no network: not even the host loopback', async (t) => {
  let connections = 0
  const server = createServer((socket) => {
    connections++
    socket.end()
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  const port = (server.address() as { port: number }).port
  const id = newSession()
  const py = await run(
    id,
    'python',
    `import socket\nfor host in ["127.0.0.1", "10.255.255.1", "1.1.1.1"]:\n    try:\n        socket.create_connection((host, ${port}), timeout=2)\n        print(host, "connected")\n    except OSError as e:\n        print(host, type(e).__name__)`,
  )
  t.notMatch(py.out, /connected/)
  t.match(py.out, /127\.0\.0\.1 ConnectionRefusedError/)
  const sh = await run(id, 'shell', `echo hi > /dev/tcp/127.0.0.1/${port} && echo connected`)
  t.notMatch(sh.out, /connected/)
  t.equal(connections, 0)
})

t.test('fork bombs are contained', async (t) => {
  const bombed = newSession()
  await run(bombed, 'shell', 'true')
  const uid = manager.uidOf(bombed)
  const bomb = run(bombed, 'shell', ':(){ :|:& };:', 5_000)
  let peak = 0
  const sampler = setInterval(() => {
    if (uid !== undefined) peak = Math.max(peak, processesOf(uid))
  }, 100)
  await new Promise((r) => setTimeout(r, 2_000))
  const other = newSession()
  const alive = await run(other, 'shell', 'echo alive')
  t.equal(alive.out, 'alive\n', 'another session still runs code')
  await bomb
  clearInterval(sampler)
  if (uid !== undefined) t.ok(peak <= MAX_PROCESSES, `at most ${MAX_PROCESSES} processes for the bombed uid (peak ${peak})`)
  await manager.restart(bombed)
  t.equal((await run(bombed, 'shell', 'echo back')).out, 'back\n', 'the bombed session works after a restart')
  if (uid !== undefined) t.ok(processesOf(uid) <= 3, 'the bomb is gone')

  const forked = newSession()
  const loop = await run(forked, 'python', 'import os\nwhile True:\n    os.fork()', 15_000)
  t.equal(loop.result.error?.name, 'BlockingIOError', 'fork fails once the limit is reached')
  t.equal((await run(other, 'python', '6 * 7')).out, '42')
  await new Promise((r) => setTimeout(r, 500))
  t.equal((await run(forked, 'python', '6 * 7')).out, '42', 'the same kernel carries on once its children are gone')
})

t.test('memory and file size limits fail inside the kernel', async (t) => {
  const id = newSession()
  const rssBefore = process.memoryUsage().rss
  const big = await run(id, 'python', 'block = bytearray(4 * 1024 ** 3)')
  t.equal(big.result.error?.name, 'MemoryError')
  const gradual = await run(id, 'python', 'blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))')
  t.equal(gradual.result.error?.name, 'MemoryError')
  t.equal((await run(id, 'python', 'del blocks\n6 * 7')).out, '42', 'the kernel survives')
  t.ok(process.memoryUsage().rss - rssBefore < 200 * 1024 * 1024, 'the server did not grow')
  const file = await run(id, 'python', 'with open("big.bin", "wb") as f:\n    f.write(b"x" * (17 * 1024 * 1024))')
  t.equal(file.result.error?.name, 'OSError')
  t.match(file.result.error?.value, /File too large/)
  const js = await run(id, 'javascript', 'const keep = []; for (;;) keep.push(new Array(1e6).fill(1))')
  t.equal(js.result.stateLost, true, 'a node heap past the limit ends that kernel, not the server')
  t.equal((await run(id, 'javascript', '6 * 7')).out, '42')
})

const enforcement = await manager.enforcement()
const asRoot = process.getuid?.() === 0
t.comment(`enforced here: ${JSON.stringify(enforcement)}`)

// A shared object that records every process that loads it, in the sandbox and on the host.
const hostMarker = join(dataDir, 'preloaded-on-host.log')
function buildPreload(dir: string): string {
  const source = join(dir, 'preload.c')
  writeFileSync(
    source,
    `#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
extern char *program_invocation_short_name;
static void record(const char *path) {
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0666);
  if (fd < 0) return;
  char caps[64] = "?", line[256];
  FILE *status = fopen("/proc/self/status", "r");
  if (status) {
    while (fgets(line, sizeof line, status)) if (!strncmp(line, "CapEff:", 7)) sscanf(line + 7, "%63s", caps);
    fclose(status);
  }
  dprintf(fd, "%s uid=%d caps=%s\\n", program_invocation_short_name, (int)geteuid(), caps);
  close(fd);
}
__attribute__((constructor)) static void loaded(void) {
  record(${JSON.stringify(hostMarker)});
  record("/workspace/preload.log");
}
`,
  )
  const library = join(dir, 'preload.so')
  execFileSync('cc', ['-shared', '-fPIC', '-o', library, source])
  return library
}

t.test('a secret named LD_PRELOAD reaches no process outside the sandbox or before the uid drop', async (t) => {
  for (const variant of ['host path', 'sandbox path']) {
    const id = newSession()
    await run(id, 'shell', 'true')
    const workspace = join(workspacesDir, id)
    const library = buildPreload(workspace)
    await manager.restart(id)
    const env = { LD_PRELOAD: variant === 'host path' ? library : '/workspace/preload.so', ESCAPE_PROBE: `probe-${MARKER}` }
    const { out } = await run(id, 'shell', 'echo "$ESCAPE_PROBE"', undefined, env)
    t.equal(out, `probe-${MARKER}\n`, `${variant}: the kernel gets the tenant's other variables`)
    t.notOk(existsSync(hostMarker), `${variant}: nothing loaded the library on the host`)
    const inside = existsSync(join(workspace, 'preload.log')) ? readFileSync(join(workspace, 'preload.log'), 'utf8') : ''
    t.equal(inside, '', `${variant}: nothing loaded it in the sandbox either (the name is refused)`)
    // The sandbox's init (bwrap) stays on the host for the kernel's life: its environment is the helpers' fixed one.
    const helpers = (await descendants(process.pid)).filter((pid) => /bwrap|prlimit/.test(safeRead(`/proc/${pid}/cmdline`)))
    t.ok(helpers.length > 0, 'the sandbox init is found')
    t.notOk(
      helpers.some((pid) => /ESCAPE_PROBE|LD_PRELOAD/.test(safeRead(`/proc/${pid}/environ`))),
      `${variant}: no tenant variable in the environment of any of ${helpers.length} host-side processes`,
    )
  }
})

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'latin1')
  } catch {
    return ''
  }
}

t.test('no capability survives into the kernel, and no host path is needed to start one', async (t) => {
  const id = newSession()
  const { out } = await run(id, 'shell', 'grep ^Cap /proc/self/status; cat /proc/1/status 2>/dev/null | grep ^CapEff; echo cwd=$PWD')
  for (const set of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) t.match(out, new RegExp(`^${set}:\\s+0{16}$`, 'm'), `${set} is empty`)
  t.match(out, /cwd=\/workspace/)
  const handle = await run(
    id,
    'python',
    'import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(128)\nctypes.memmove(buf, (128).to_bytes(4, "little"), 4)\nmount_id = ctypes.c_int()\nr = libc.name_to_handle_at(-100, b"/workspace", buf, ctypes.byref(mount_id), 0)\nr = libc.open_by_handle_at(-100, buf, 0)\nprint("open_by_handle_at", r, errno.errorcode.get(ctypes.get_errno()))',
  )
  t.match(handle.out, /open_by_handle_at -1 EPERM/, 'file handles cannot reach the host filesystem')
})

t.test('seccomp: namespaces, io_uring, the keyring, tracing, eBPF and perf are refused', { skip: enforcement.seccomp ? false : enforcement.seccompReason }, async (t) => {
  const id = newSession()
  const py = await run(
    id,
    'python',
    `import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(number, *args):
    result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno())
params = ctypes.create_string_buffer(120)
print("unshare", call(272, 0x10000000))
print("io_uring_setup", call(425, 4, params))
print("keyctl", call(250, 0, -3, 1))
print("add_key", call(248, ctypes.c_char_p(b"user"), ctypes.c_char_p(b"k"), ctypes.c_char_p(b"v"), 1, -3))
print("ptrace", call(101, 0, 0, 0, 0))
print("bpf", call(321, 0, params, 120))
print("perf_event_open", call(298, params, 0, -1, -1, 0))
print("setns", call(308, 0, 0))
print("init_module", call(175, params, 0, ctypes.c_char_p(b"")))
print("reboot", call(169, 0, 0, 0, 0))`,
  )
  for (const name of ['unshare', 'io_uring_setup', 'keyctl', 'add_key', 'ptrace', 'bpf', 'perf_event_open', 'setns', 'init_module', 'reboot'])
    t.match(py.out, new RegExp(`^${name} EPERM$`, 'm'), `${name} is refused`)
  const sh = await run(id, 'shell', 'unshare -U true 2>&1; unshare -r -m true 2>&1; echo done')
  t.notMatch(sh.out, /^done\n$/, 'the unshare program fails')
  t.match(sh.out, /Operation not permitted/)
})

t.test('memory is limited per kernel: four 800 MB children in a 1024 MB kernel cannot all live', { skip: enforcement.cgroups.enforced.includes('memory') ? false : `no memory cgroup: ${enforcement.cgroups.missing.memory}` }, async (t) => {
  const id = newSession()
  const { out, result } = await run(
    id,
    'python',
    `import os, signal
r, w = os.pipe()
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            block = b"x" * (800 * 1024 * 1024)
            os.write(w, f"{os.getpid()}\\n".encode())
            signal.pause()
        finally:
            os._exit(0)
    kids.append(pid)
os.close(w)
holding, dead = set(), set()
reader = os.fdopen(r)
while len(holding | dead) < 4:
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        dead.add(pid)
        continue
    import select
    if select.select([reader], [], [], 0.05)[0]:
        line = reader.readline()
        if line:
            holding.add(int(line))
while True:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if not pid:
        break
    dead.add(pid)
alive = holding - dead
print("alive", len(alive), "killed", len(dead))
for pid in kids:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
for pid in kids:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass`,
    60_000,
  )
  t.equal(result.stateLost, false, 'the OOM killer took the children, not the kernel')
  const alive = Number(/alive (\d+)/.exec(out)?.[1] ?? 99)
  t.ok(alive <= 1, `at most one child holds its 800 MB at a time (${out.trim()})`)
  t.equal((await run(id, 'python', '6 * 7')).out, '42', 'the kernel carries on')
})

t.test('/tmp and /dev/shm are sized: filling them fails inside the kernel', async (t) => {
  const id = newSession()
  for (const dir of ['/dev/shm', '/tmp']) {
    const { out } = await run(id, 'shell', `for i in $(seq 40); do head -c 8M /dev/zero > ${dir}/fill$i || break; done 2>&1; du -sm ${dir} | cut -f1; rm -f ${dir}/fill*`)
    t.match(out, /No space left on device/, `${dir} fills up`)
    const used = Number(out.trim().split('\n').pop())
    t.ok(used <= options.tmpfsMb, `${dir} held ${used} MiB, the size is ${options.tmpfsMb} MiB`)
  }
})

// Writes a forged report line to every descriptor above stderr and tries to read from each one,
// from a process started by the kernel: it must hold neither channel.
const PROBE_CHILD = `import os, fcntl
got = []
for fd in range(3, 64):
    try:
        os.fstat(fd)
    except OSError:
        continue
    try:
        os.write(fd, b'{"type":"result","text":"forged"}\\n')
    except OSError:
        pass
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
        data = os.read(fd, 4096)
        if data:
            got.append(data)
    except OSError:
        pass
print("stolen", got)`

t.test('kernel channels: not inherited by child processes, and a forged end does not end an execution', async (t) => {
  const id = newSession()
  const launchers: Record<Language, string> = {
    python: `import subprocess\nsubprocess.run(["python3", "-c", ${JSON.stringify(PROBE_CHILD)}])`,
    shell: `python3 -c ${shellQuote(PROBE_CHILD)}`,
    javascript: `const { execFileSync } = await import('node:child_process'); execFileSync('python3', ['-c', ${JSON.stringify(PROBE_CHILD)}], { stdio: ['ignore', 'inherit', 'inherit'] }); undefined`,
  }
  for (const [language, code] of Object.entries(launchers) as [Language, string][]) {
    const outputs: KernelOutput[] = []
    const result = await manager.execute({ sessionId: id, tenantId: 'tenant', language, code, onOutput: (o) => outputs.push(o) })
    const out = outputs.map((o) => ('text' in o ? o.text : '')).join('')
    t.match(out, /stolen \[\]/, `${language}: a child process reads no command`)
    t.notOk(
      outputs.some((o) => o.type === 'result' && o.text === 'forged'),
      `${language}: a child process cannot write a report`,
    )
    t.equal(result.stateLost, false, `${language}: the kernel is intact`)
  }

  const forgedPython = await run(
    id,
    'python',
    'import os, sys, time\nnonce = None\nframe = sys._getframe()\nwhile frame:\n    nonce = frame.f_locals.get("nonce", nonce) if isinstance(frame.f_locals.get("nonce"), bytes) else nonce\n    report = frame.f_globals.get("REPORT_FD")\n    frame = frame.f_back\nif nonce:\n    sys.stdout.write("\\x02oi-end:" + nonce.decode() + "\\x03"); sys.stdout.flush()\n    sys.stderr.write("\\x02oi-end:" + nonce.decode() + "\\x03"); sys.stderr.flush()\n    os.write(report, b\'{"type":"done","nonce":"\' + nonce + b\'","exit_code":0}\\n\')\ntime.sleep(0.3)\nprint("after")',
  )
  t.match(forgedPython.out, /after/, 'python: the code could not find the nonce to forge the end with')
  const forgedShell = await run(id, 'shell', "printf '\\002oi-end:%s\\003' \"$__oi_nonce\"; printf '\\002oi-end:%s\\003' \"$__oi_nonce\" >&2; sleep 0.3; echo after")
  t.match(forgedShell.out, /after/, 'shell: the nonce of the running execution is not in a variable')
})

function shellQuote(text: string): string {
  return `'${text.replaceAll("'", "'\\''")}'`
}

t.test('an oversize report line or a flood of reports stops that kernel', async (t) => {
  const findReport = 'import os, sys\nframe = sys._getframe()\nwhile frame.f_back:\n    frame = frame.f_back\nfd = frame.f_globals["REPORT_FD"]\n'
  for (const [what, code, notice] of [
    ['oversize', `${findReport}os.write(fd, b"x" * (20 * 1024 * 1024))\nprint("written")`, /more than \d+ bytes/],
    ['flood', `${findReport}for _ in range(20000):\n    os.write(fd, b'{"type":"result","text":"x"}\\n')\nprint("written")`, /more than 10000 reports/],
  ] as const) {
    const id = newSession()
    await run(id, 'python', 'kept = 1')
    const outputs: KernelOutput[] = []
    const result = await manager.execute({ sessionId: id, tenantId: 'tenant', language: 'python', code, onOutput: (o) => outputs.push(o) })
    t.equal(result.stateLost, true, `${what}: the kernel was stopped`)
    t.match(outputs.filter((o) => o.type === 'notice').map((o) => o.text).join(' '), notice, `${what}: and says why`)
    t.equal((await run(id, 'python', '6 * 7')).out, '42', `${what}: the session gets a new kernel`)
  }
})

t.test('a killed server leaves no kernel runtime directory behind after the next start', async (t) => {
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', `
    import { KernelManager } from ${JSON.stringify(new URL('../../services/kernels/manager.ts', import.meta.url).href)}
    const m = new KernelManager(${JSON.stringify({ ...options, workspacesDir: join(dataDir, 'killed-workspaces') })})
    await m.execute({ sessionId: 'killed', tenantId: 'tenant', language: 'shell', code: 'true' })
    console.log('ready')
    setInterval(() => {}, 1000)
  `], { stdio: ['ignore', 'pipe', 'inherit'] })
  t.teardown(() => child.kill('SIGKILL'))
  const runtimeDirs = () => readdirSync(tmpdir()).filter((name) => name.startsWith(`oi-kernels-${child.pid}-`))
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (chunk: Buffer) => chunk.toString().includes('ready') && resolve())
    child.once('exit', () => reject(new Error('the child server exited early')))
  })
  t.equal(runtimeDirs().length, 1, 'the server made its runtime directory')
  child.kill('SIGKILL')
  await once(child, 'exit')
  t.equal(runtimeDirs().length, 1, 'a killed server cannot clean up')
  const next = new KernelManager({ ...options, workspacesDir: join(dataDir, 'next-workspaces') })
  t.teardown(() => next.close())
  await next.enforcement()
  t.same(runtimeDirs(), [], 'the next server removed it')
})

t.test('uids are never shared by two live sessions', { skip: asRoot ? false : 'kernels share the server uid without root' }, async (t) => {
  const { UidAllocator } = await import('../../services/kernels/sandbox.js')
  const allocator = new UidAllocator()
  const uids = new Set<number | undefined>()
  for (let i = 0; i < 20_000; i++) uids.add(allocator.acquire(`session-${i}`))
  t.equal(uids.size, 20_000, '20,000 live sessions, 20,000 uids')
  allocator.release('session-7')
  t.equal(allocator.acquire('session-7'), allocator.uidOf('session-7'), 'a released session gets a uid again')
})

t.test('enforcement is detected and reported', async (t) => {
  t.equal(enforcement.sandbox, 'bwrap')
  t.equal(enforcement.tmpfsMb, options.tmpfsMb)
  t.ok(['v1', 'v2', 'none'].includes(enforcement.cgroups.layout))
  for (const controller of ['memory', 'pids', 'cpu'] as const)
    t.ok(enforcement.cgroups.enforced.includes(controller) !== (enforcement.cgroups.missing[controller] !== undefined), `${controller}: enforced or a reason`)
})

t.test('the workspace quota holds for code: a writer is stopped, an execution that ends over it is told on the next one', async (t) => {
  const id = newSession()
  await run(id, 'python', 'kept = 1')
  const writer = await run(
    id,
    'python',
    'import time\nfor i in range(400):\n    with open(f"fill{i}.bin", "wb") as f:\n        f.write(b"x" * (1024 * 1024))\n    time.sleep(0.05)\nprint("finished")',
    60_000,
  )
  t.notMatch(writer.out, /finished/, 'the writer did not get to write 400 MB')
  t.equal(writer.result.stateLost, true, 'its kernel was stopped')
  t.match(writer.out, /passed its quota of 48 MB or 500 files/)
  const cleaned = await run(id, 'shell', 'rm -f fill*.bin; echo cleaned')
  t.match(cleaned.out, /cleaned/, 'code can still run to delete files')
  const files = await run(id, 'shell', 'mkdir many; for i in $(seq 600); do : > many/$i; done; echo made')
  t.match(files.out, /made/)
  // measured after the answer (off its path), reported first thing by the next execution, in any language
  const next = await run(id, 'python', 'print("next")')
  t.match(next.out, /passed its quota of 48 MB or 500 files[\s\S]*next/, 'too many files: the next execution is told, before its own output')
  await run(id, 'shell', 'rm -rf many')
  t.notMatch((await run(id, 'shell', 'echo clean')).out, /quota/, 'back under the quota: no notice')
})
