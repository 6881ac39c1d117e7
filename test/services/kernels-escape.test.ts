import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { KernelManager } from '../../services/kernels/manager.js'
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
  const out = outputs.map((o) => (o.type === 'image' ? '' : o.text)).join('')
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
  t.match(py.out, /'1environ': 'PermissionError'/, "the sandbox's init is not readable")
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
  const started = Date.now()
  const alive = await run(other, 'shell', 'echo alive')
  t.equal(alive.out, 'alive\n', 'another session still runs code')
  t.ok(Date.now() - started < 5_000)
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
