import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { capForModel } from '../../services/agent/cap.js'
import { KernelManager, resolveLanguage } from '../../services/kernels/manager.js'
import { descendants } from '../../services/kernels/processes.js'
import { LineSplitter, parseReport, SentinelScanner, sentinel } from '../../services/kernels/protocol.js'
import { checkSandbox } from '../../services/kernels/sandbox.js'
import type { ExecResult, KernelManagerOptions, KernelOutput, Language } from '../../services/kernels/types.js'

const workspacesDir = mkdtempSync(join(tmpdir(), 'oi-kernels-test-'))
t.teardown(() => rmSync(workspacesDir, { recursive: true, force: true }))

const options = (over: Partial<KernelManagerOptions> = {}): KernelManagerOptions => ({
  workspacesDir,
  sandbox: 'bwrap',
  sandboxNetwork: false,
  pythonBin: existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3',
  nodeBin: process.execPath,
  bashBin: '/bin/bash',
  idleSeconds: 600,
  maxKernels: 20,
  maxKernelsPerTenant: 20,
  execTimeoutMs: 15_000,
  execGraceMs: 1_000,
  outputLimitBytes: 1_000_000,
  memoryMb: 1024,
  maxProcesses: 64,
  maxFileMb: 64,
  maxOpenFiles: 256,
  tmpfsMb: 64,
  workspaceQuota: { maxBytes: 0, maxFiles: 0 },
  ...over,
})

const managers: KernelManager[] = []
function manager(over: Partial<KernelManagerOptions> = {}): KernelManager {
  const made = new KernelManager(options(over), { info() {}, warn: (o, m) => console.error(m, o), error: (o, m) => console.error(m, o) })
  managers.push(made)
  return made
}
t.teardown(() => Promise.all(managers.map((m) => m.close())))

interface Run {
  result: ExecResult
  outputs: KernelOutput[]
  stdout: string
  stderr: string
  notices: string[]
  results: string[]
  images: string[]
}

let sessions = 0
const newSession = () => `session-${process.pid}-${++sessions}`

async function run(
  m: KernelManager,
  sessionId: string,
  language: Language,
  code: string,
  extra: { timeoutMs?: number; signal?: AbortSignal; env?: Record<string, string>; tenantId?: string; activeLines?: boolean } = {},
): Promise<Run> {
  const outputs: KernelOutput[] = []
  const result = await m.execute({ sessionId, tenantId: 'tenant', language, code, ...extra, onOutput: (o) => outputs.push(o) })
  const text = (stream: 'stdout' | 'stderr') =>
    outputs
      .filter((o) => o.type === 'stream' && o.stream === stream)
      .map((o) => (o as { text: string }).text)
      .join('')
  return {
    result,
    outputs,
    stdout: text('stdout'),
    stderr: text('stderr'),
    notices: outputs.filter((o) => o.type === 'notice').map((o) => (o as { text: string }).text),
    results: outputs.filter((o) => o.type === 'result').map((o) => (o as { text: string }).text),
    images: outputs.filter((o) => o.type === 'image').map((o) => (o as { data: string }).data),
  }
}

const sandboxCheck = await checkSandbox(options())
t.ok(sandboxCheck.ok, `bubblewrap works here: ${sandboxCheck.reason ?? 'ok'}`)

t.test('protocol pieces', async (t) => {
  t.test('a sentinel split across chunks is found and stripped', async (t) => {
    const marker = sentinel('0123456789abcdef0123456789abcdef')
    const data = Buffer.concat([Buffer.from('héllo \x02oi-end:not-it\x03 '), marker, Buffer.from('late')])
    for (const size of [1, 2, 3, 7, 1000]) {
      const out: Buffer[] = []
      let seen = 0
      const scanner = new SentinelScanner(
        (b) => out.push(Buffer.from(b)),
        () => seen++,
      )
      scanner.expect(marker)
      for (let i = 0; i < data.length; i += size) scanner.push(data.subarray(i, i + size))
      t.equal(seen, 1, `chunks of ${size}`)
      t.equal(Buffer.concat(out).toString(), 'héllo \x02oi-end:not-it\x03 late')
    }
  })
  t.test('report lines are bounded and validated', async (t) => {
    const lines: string[] = []
    const dropped: number[] = []
    const splitter = new LineSplitter(
      10,
      (l) => lines.push(l),
      (n) => dropped.push(n),
    )
    splitter.push(Buffer.from('short\nthis line is far too long\nok'))
    splitter.push(Buffer.from('\n'))
    t.same(lines, ['short'], 'nothing is read past a line that is too long')
    t.same(dropped, [25], 'which is reported once')
    t.equal(parseReport('{not json'), undefined)
    t.equal(parseReport('{"type":"image","format":"gif","data":"x"}'), undefined)
    t.same(parseReport('{"type":"done","nonce":"n","exit_code":3}'), { type: 'done', nonce: 'n', exitCode: 3 })
    t.same(parseReport('{"type":"line","line":3}'), { type: 'line', line: 3 })
    for (const line of ['0', '-1', '2.5', '"2"', 'null', '1e300', '99999999999'])
      t.equal(parseReport(`{"type":"line","line":${line}}`), undefined, `line ${line} is not a line number`)
  })
})

const linesOf = (r: Run) => r.outputs.filter((o) => o.type === 'active_line').map((o) => (o as { line: number }).line)

t.test('active lines are reported only when asked for', async (t) => {
  const m = manager()
  const id = newSession()
  const three = await run(m, id, 'python', 'a = 1\nb = a + 1\nprint(a + b)', { activeLines: true })
  t.same(linesOf(three), [1, 2, 3], 'each statement reports its line before it runs')
  t.equal(three.stdout, '3\n', 'and nothing of it reaches stdout')
  t.same(linesOf(await run(m, id, 'python', 'a = 1\nb = a + 1\nprint(a + b)')), [], 'without the flag: no line reports')

  const loop = await run(m, id, 'python', 'total = 0\nfor i in range(3):\n    total += i\n    print(i)\ntotal', { activeLines: true })
  t.same(linesOf(loop), [1, 2, 3, 4, 3, 4, 3, 4, 5], 'a loop reports its body on every pass, then the trailing expression')
  t.same(loop.results, ['3'], 'the trailing expression is still displayed')
  t.equal(loop.stdout, '0\n1\n2\n')

  const syntax = await run(m, id, 'python', 'x = 1\ny = (\n', { activeLines: true })
  t.same(linesOf(syntax), [], 'a cell that does not parse runs no line')
  t.equal(syntax.result.error?.name, 'SyntaxError')
  t.match(syntax.result.error?.traceback, /<cell-\d+>", line 2/, "the user's line numbers")
  const failing = await run(m, id, 'python', 'a = 1\nb = 1 / 0\nc = 3', { activeLines: true })
  t.same(linesOf(failing), [1, 2])
  t.equal(failing.result.error?.name, 'ZeroDivisionError')
  t.match(failing.result.error?.traceback, /line 2, in <module>\n\s+b = 1 \/ 0/, 'the traceback quotes the line that failed')
  t.notMatch(failing.result.error?.traceback, /__oi_active_line__|python_driver/, 'and shows nothing of the instrumentation')

  const special = await run(m, id, 'python', '"""module doc"""\nfrom __future__ import annotations\ndef f():\n    """f doc"""\n    global g\n    g = 5\n    return f.__doc__\nf()', {
    activeLines: true,
  })
  t.equal(special.result.error, undefined, '`from __future__` and docstrings stay first')
  t.same(special.results, ["'f doc'"])
  t.same(linesOf(special), [3, 8, 6, 7], 'functions of the cell report their lines as they are called')
  t.same((await run(m, id, 'python', 'g')).results, ['5'], '`global` still declares')
  t.same(linesOf(await run(m, id, 'python', 'f()\n', { activeLines: true })), [1], "a function of an earlier cell does not report its lines as this cell's")

  const forged = await run(
    m,
    id,
    'python',
    'import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b\'{"type":"line","line":999}\\n{"type":"line","line":1.5}\\n{"type":"line","line":"1"}\\n\')\n    except OSError:\n        pass',
    { activeLines: true },
  )
  t.ok(
    linesOf(forged).every((line) => Number.isInteger(line) && line >= 1 && line <= 6),
    'forged reports of lines the cell does not have, or that are not line numbers, are ignored',
  )
  t.same((await run(m, id, 'python', '1 + 1')).results, ['2'], 'and do not stop the kernel')

  const shell = await run(m, id, 'shell', 'echo a\necho b', { activeLines: true })
  t.same(linesOf(shell), [1, 2], 'shell: each command reports its line')
  t.equal(shell.stdout, 'a\nb\n')
  const shellLoop = await run(m, id, 'shell', 'for i in 1 2; do\n  echo $i\ndone\nf() { echo in f; }\nf', { activeLines: true })
  t.same(linesOf(shellLoop), [1, 2, 1, 2, 5], "a shell loop reports each pass; a function call reports its caller's line")
  t.equal(shellLoop.stdout, '1\n2\nin f\n')
  const status = await run(m, id, 'shell', 'false\necho "status $?"', { activeLines: true })
  t.equal(status.stdout, 'status 1\n', 'the trap keeps $?')
  const after = await run(m, id, 'shell', 'echo a\necho b')
  t.same(linesOf(after), [], 'shell without the flag: no line reports, the trap is gone')
  t.equal(after.stdout, 'a\nb\n')
  const fds = async () => (await run(m, id, 'shell', 'ls /proc/$$/fd | wc -l')).stdout
  const before = await fds()
  await run(m, id, 'shell', 'true', { activeLines: true })
  t.equal(await fds(), before, 'the line descriptor is closed after the cell')

  const js = await run(m, id, 'javascript', 'const q = 1\nq + 1', { activeLines: true })
  t.same(js.results, ['2'], 'JavaScript takes the flag and runs the code')
  t.same(linesOf(js), [], 'but reports no lines')
})

t.test('languages and aliases', async (t) => {
  const m = manager()
  const languages = await m.languages()
  t.equal(await m.languages(), languages, 'detected once, then cached')
  t.same(
    languages.map((l) => [l.name, l.available]),
    [
      ['python', true],
      ['shell', true],
      ['javascript', true],
    ],
  )
  t.match(languages.find((l) => l.name === 'javascript')?.version, process.versions.node)
  const aliases: [string, Language | undefined][] = [
    ['py', 'python'],
    ['Python3', 'python'],
    ['bash', 'shell'],
    ['sh', 'shell'],
    ['js', 'javascript'],
    ['node', 'javascript'],
    ['zsh', 'shell'],
    [' NodeJS ', 'javascript'],
    ['ruby', undefined],
  ]
  for (const [alias, name] of aliases) t.equal(resolveLanguage(alias), name, alias)
  t.equal(capForModel('x'.repeat(10), 2800), 'x'.repeat(10))
  t.match(capForModel('a'.repeat(3000) + 'END', 2800), /^a+\n\[… \d+ characters cut …\]\na*END$/)
})

t.test('state persists per language', async (t) => {
  const m = manager()
  const id = newSession()
  await run(m, id, 'python', 'import json\nx = 41')
  t.same((await run(m, id, 'python', 'json.dumps({"x": x + 1})')).results, [`'{"x": 42}'`])
  await run(m, id, 'shell', 'mkdir -p sub && cd sub && export GREETING=hi && COUNT=3')
  const shell = await run(m, id, 'shell', 'echo "$(pwd) $GREETING $COUNT"; bash -c \'echo child sees $GREETING\'')
  t.equal(shell.stdout, '/workspace/sub hi 3\nchild sees hi\n')
  await run(m, id, 'javascript', 'const base = 40; let step = 1; var path = require("node:path")')
  t.same((await run(m, id, 'javascript', 'base + step + 1')).results, ['42'])
  t.same((await run(m, id, 'javascript', 'path.basename("/a/b.txt")')).results, ["'b.txt'"])
  t.same((await run(m, id, 'python', 'x')).results, ['41'], 'python is untouched by the other languages')
})

t.test('trailing expressions and top-level await', async (t) => {
  const m = manager()
  const id = newSession()
  t.same((await run(m, id, 'python', 'a = [1, 2]\na + [3]')).results, ['[1, 2, 3]'])
  t.same((await run(m, id, 'python', 'None')).results, [], 'None shows nothing')
  t.same((await run(m, id, 'python', 'print("side effect")')).results, [], 'a print call is not a value')
  t.same((await run(m, id, 'python', 'import asyncio\nawait asyncio.sleep(0.01)\n"awaited"')).results, ["'awaited'"])
  t.same((await run(m, id, 'javascript', '({ a: 1, b: [1, 2] })')).results, ['{ a: 1, b: [ 1, 2 ] }'])
  t.same((await run(m, id, 'javascript', 'undefined')).results, [])
  const awaited = await run(m, id, 'javascript', 'const v = await new Promise((r) => setTimeout(() => r(7), 50)); v * 6')
  t.same(awaited.results, ['42'])
  t.same((await run(m, id, 'javascript', 'v')).results, ['7'], 'a declaration made with top-level await persists')
})

t.test('the JavaScript kernel takes ES module syntax', async (t) => {
  const m = manager()
  const id = newSession()
  const first = await run(
    m,
    id,
    'javascript',
    'import fs from "node:fs"\nimport { join as joinPath } from "node:path"\nimport * as os from "node:os"\nexport const answer = await Promise.resolve(42)\nexport function twice(n) { return n * 2 }\n`${typeof fs.readFileSync} ${joinPath("a", "b")} ${typeof os.platform}`',
  )
  t.same([first.result.error, first.results], [undefined, ["'function a/b function'"]])
  const second = await run(m, id, 'javascript', 'import fs from "node:fs"\nexport default twice(answer)')
  t.same([second.result.error, second.results], [undefined, ['84']], 'declarations persist and an import can be repeated')
})

t.test('stdout and stderr stay apart and stream as produced', async (t) => {
  const m = manager()
  const id = newSession()
  const py = await run(m, id, 'python', 'import sys, subprocess\nprint("out")\nprint("err", file=sys.stderr)\nsubprocess.run(["sh", "-c", "echo sub-out; echo sub-err >&2"])\nimport os\nos.write(1, b"c-level\\n")')
  t.equal(py.stdout, 'out\nsub-out\nc-level\n')
  t.equal(py.stderr, 'err\nsub-err\n')
  const sh = await run(m, id, 'shell', 'echo o; echo e >&2')
  t.equal(sh.stdout, 'o\n')
  t.equal(sh.stderr, 'e\n')
  const js = await run(m, id, 'javascript', 'console.log("log"); console.error("error"); process.stdout.write("raw")')
  t.equal(js.stdout, 'log\nraw')
  t.equal(js.stderr, 'error\n')

  // Each program prints a line, then waits for a file the test writes only once that line has
  // reached it: the execution can finish only if output streams while the code still runs.
  const go = join(workspacesDir, id, 'go')
  for (const [language, code] of [
    ['python', 'import os, time\nprint(0, flush=True)\nwhile not os.path.exists("/workspace/go"):\n    time.sleep(0.01)\nprint(1)'],
    ['shell', 'echo 0; while [ ! -e /workspace/go ]; do sleep 0.01; done; echo 1'],
    ['javascript', 'const fs = await import("node:fs")\nconsole.log(0)\nwhile (!fs.existsSync("/workspace/go")) await new Promise((r) => setTimeout(r, 10))\nconsole.log(1)'],
  ] as const) {
    rmSync(go, { force: true })
    let streamed = 0
    const onOutput = (o: KernelOutput) => {
      if (o.type === 'stream' && ++streamed === 1) writeFileSync(go, '')
    }
    const result = await m.execute({ tenantId: 'tenant', sessionId: id, language, code, onOutput })
    t.equal(result.exitCode, 0, `${language}: the first line arrived while the code was still running`)
    t.equal(result.timedOut, false)
    t.ok(streamed >= 2, `${language}: ${streamed} output callbacks`)
  }
})

t.test('the model reads output as a terminal shows it, the client gets it raw', async (t) => {
  const m = manager()
  const id = newSession()
  const progress = await run(
    m,
    id,
    'python',
    'import sys\nfor i in range(2001):\n    sys.stdout.write(f"\\rprogress {i / 20:5.1f}% [{\'#\' * (i // 100):<20}]")\nprint()\nfor row in range(60):\n    print(f"row {row:2d}: value {row * row:5d}")',
  )
  t.equal(progress.stdout.split('\r').length - 1, 2001, 'the client gets every redraw')
  const seen = capForModel(progress.stdout)
  t.equal(seen.split('\n')[0], 'progress 100.0% [####################]', 'the model gets the last frame only')
  t.equal(seen.split('progress').length - 1, 1)
  t.same(
    seen.trimEnd().split('\n').slice(1),
    Array.from({ length: 60 }, (_, row) => `row ${String(row).padStart(2)}: value ${String(row * row).padStart(5)}`),
    'and all 60 rows',
  )
  const colours = await run(m, id, 'shell', "printf '\\033[32mPASSED\\033[0m\\n\\033]0;a title\\007done\\n50%%\\b\\b\\b75%%\\n'")
  t.ok(colours.stdout.includes('\x1b[32m'), 'the client gets the escape sequences')
  t.equal(capForModel(colours.stdout), 'PASSED\ndone\n75%\n')
})

t.test('UTF-8 is never split inside a character', async (t) => {
  const m = manager()
  const id = newSession()
  const r = await run(m, id, 'python', 'import os, time\nos.write(1, b"price: \\xe2")\ntime.sleep(0.2)\nos.write(1, b"\\x82\\xac and \\xf0\\x9f")\ntime.sleep(0.2)\nos.write(1, b"\\x98\\x80\\n")')
  t.equal(r.stdout, 'price: € and 😀\n')
  t.notOk(r.outputs.some((o) => o.type === 'stream' && o.text.includes('\uFFFD')))
})

t.test('a fake end marker printed by user code does not end the execution', async (t) => {
  const m = manager()
  const id = newSession()
  const fake = '\\x02oi-end:00000000000000000000000000000000\\x03'
  const py = await run(m, id, 'python', `import sys, time\nprint("${fake}")\nprint("${fake}", file=sys.stderr)\nprint('{"type": "done", "nonce": "00000000000000000000000000000000", "exit_code": 0}')\ntime.sleep(0.3)\nprint("after")`)
  t.match(py.stdout, /after\n$/)
  t.match(py.stdout, /oi-end:0{32}/, 'the fake marker is passed through as output')
  const sh = await run(m, id, 'shell', `printf '\\002oi-end:%s\\003\\n' fake; sleep 0.3; echo after`)
  t.match(sh.stdout, /after\n$/)
})

t.test('errors come back with tracebacks trimmed to the user code', async (t) => {
  const m = manager()
  const id = newSession()
  const py = await run(m, id, 'python', 'def divide(a):\n    return a / 0\n\ndivide(1)')
  t.equal(py.result.exitCode, 1)
  t.equal(py.result.error?.name, 'ZeroDivisionError')
  t.equal(py.result.error?.value, 'division by zero')
  t.match(py.result.error?.traceback, /File "<cell-1>", line 4, in <module>\n {4}divide\(1\)/)
  t.match(py.result.error?.traceback, /line 2, in divide\n {4}return a \/ 0/)
  t.notMatch(py.result.error?.traceback, /python_driver/)
  const syntax = await run(m, id, 'python', 'if (:\n  pass')
  t.equal(syntax.result.error?.name, 'SyntaxError')
  t.notMatch(syntax.result.error?.traceback, /Traceback|python_driver/)
  const input = await run(m, id, 'python', 'input("name? ")')
  t.equal(input.result.error?.name, 'EOFError', 'input() fails at once instead of waiting')
  t.notMatch(input.result.error?.traceback, /python_driver/)
  t.same((await run(m, id, 'python', '1 + 1')).results, ['2'], 'the kernel carries on after errors')

  const js = await run(m, id, 'javascript', 'function boom() { null.x }\nboom()')
  t.equal(js.result.error?.name, 'TypeError')
  t.match(js.result.error?.traceback, /at boom \(cell-1:1:\d+\)/)
  t.notMatch(js.result.error?.traceback, /node_driver|node:repl|node:vm/)
  const rejected = await run(m, id, 'javascript', 'await Promise.reject(new RangeError("nope"))')
  t.equal(rejected.result.error?.name, 'RangeError')
  t.same((await run(m, id, 'javascript', '6 * 7')).results, ['42'])
})

t.test('JavaScript errors raised by what a cell started belong to that cell', async (t) => {
  const m = manager()
  const background: { sessionId: string; language: Language; output: KernelOutput }[] = []
  m.onBackgroundOutput = ({ sessionId, language, output }) => background.push({ sessionId, language, output })
  const id = newSession()
  for (const [code, name, value, frame] of [
    ['Promise.reject(new Error("un-awaited"))', 'Error', 'un-awaited', /at cell-\d+:1:16/],
    ['async function load() { throw new TypeError("async") }\nload()\n"returned"', 'TypeError', 'async', /at load \(cell-\d+:1:/],
    ['setTimeout(() => { throw new RangeError("timer") }, 0)\n1', 'RangeError', 'timer', /at Timeout\._onTimeout \(cell-\d+:1:/],
    ['await new Promise((r) => setTimeout(r, 20_000)); "never"', undefined, undefined, undefined],
  ] as const) {
    // The last cell waits long: a rejection made while it runs ends it.
    const code2 = name === undefined ? `setTimeout(() => Promise.reject(new Error("while running")), 50)\n${code}` : code
    const r = await run(m, id, 'javascript', code2)
    t.equal(r.result.exitCode, 1, code2)
    t.equal(r.result.error?.name, name ?? 'Error')
    t.equal(r.result.error?.value, value ?? 'while running')
    if (frame) t.match(r.result.error?.traceback, frame, 'the user\'s frame')
    t.notMatch(r.result.error?.traceback ?? '', /node:internal|node_driver|node:repl|node:domain/, 'no frame of the driver or of Node')
    t.same(r.results, [], 'no value once the cell failed')
  }
  t.same(background, [], 'nothing was left for later')

  // A straggler: its cell has ended when it comes, so it is a background error, not the next cell's.
  const quiet = await run(m, id, 'javascript', 'setTimeout(() => { throw new Error("straggler") }, 300); "started"')
  t.same([quiet.result.exitCode, quiet.result.error, quiet.results], [0, undefined, ["'started'"]])
  // Waits for the straggler, giving up after a minute so that a missing one fails the test.
  for (let polls = 0; polls < 3000 && !background.some((b) => b.output.type === 'stream' && b.output.text.includes('straggler')); polls++) {
    await new Promise((r) => setTimeout(r, 20))
  }
  const label = background.map((b) => (b.output.type === 'stream' ? `${b.output.stream} ${b.output.text}` : '')).join('')
  t.match(label, /^stderr \[background error\] \(cell-\d+\) Uncaught Error: straggler\n {4}at Timeout\._onTimeout \(cell-\d+:1:\d+\)\n$/)
  t.same([background[0]?.sessionId, background[0]?.language], [id, 'javascript'])
  const next = await run(m, id, 'javascript', '"next"')
  t.same([next.result.exitCode, next.stderr, next.results], [0, '', ["'next'"]], 'the next cell starts clean')
})

t.test('shell syntax errors fail fast and exit restarts the shell', async (t) => {
  const m = manager()
  const id = newSession()
  await run(m, id, 'shell', 'KEPT=yes')
  const quote = await run(m, id, 'shell', 'echo "unterminated')
  t.equal(quote.result.timedOut, false, 'no hang: it failed without waiting for the timeout')
  t.equal(quote.result.exitCode, 2)
  t.match(quote.stderr, /unexpected EOF/)
  t.equal((await run(m, id, 'shell', 'echo $KEPT')).stdout, 'yes\n', 'the shell survived')

  const exited = await run(m, id, 'shell', 'echo bye; exit 3')
  t.equal(exited.stdout, 'bye\n')
  t.equal(exited.result.exitCode, 3)
  t.equal(exited.result.stateLost, true)
  t.match(exited.notices.join(' '), /shell exited \(exit code 3\).*new shell starts/)
  const after = await run(m, id, 'shell', 'echo "kept=${KEPT:-gone}"')
  t.equal(after.stdout, 'kept=gone\n')
  t.equal(after.result.exitCode, 0)
})

t.test('shell messages name bash, not a path of the driver', async (t) => {
  const m = manager()
  const id = newSession()
  const syntax = await run(m, id, 'shell', 'echo "unterminated')
  t.equal(syntax.stderr, "bash: eval: line 1: unexpected EOF while looking for matching `\"'\n")
  const missing = await run(m, id, 'shell', 'true\nno-such-command-here')
  t.equal(missing.stderr, 'bash: line 2: no-such-command-here: command not found\n')
  t.equal((await run(m, id, 'shell', 'echo $0')).stdout, 'bash\n')
})

t.test('redirecting or closing stdout and stderr neither hangs nor gets the end markers', async (t) => {
  const m = manager()
  const id = newSession()
  const file = (name: string) => readFileSync(join(workspacesDir, id, name), 'utf8')
  const sh = await run(m, id, 'shell', 'KEPT=yes; exec > out.txt 2>&1; echo hidden; echo oops >&2')
  t.same([sh.result.exitCode, sh.result.timedOut, sh.result.stateLost, sh.stdout, sh.stderr], [0, false, false, '', ''])
  await run(m, id, 'shell', 'echo more')
  t.equal(file('out.txt'), 'hidden\noops\nmore\n', 'the file has what the code wrote, and no marker')
  const closed = await run(m, id, 'shell', 'exec 1>&- 2>&-; echo gone; echo "$KEPT" > kept.txt')
  t.same([closed.result.exitCode, closed.result.timedOut, closed.result.stateLost], [0, false, false])
  t.equal(file('kept.txt'), 'yes\n', 'the shell kept its variables')

  const py = await run(m, id, 'python', 'import os, sys\nkept = 1\nsys.stdout = open("py.txt", "w")\nprint("to the file")')
  t.same([py.result.exitCode, py.result.timedOut, py.stdout], [0, false, ''])
  t.same((await run(m, id, 'python', 'sys.stdout.close()\nsys.stdout = sys.__stdout__\nprint("back")')).stdout, 'back\n')
  t.equal(file('py.txt'), 'to the file\n')
  const dup = await run(m, id, 'python', 'saved = os.dup(1)\nos.dup2(os.open("dup.txt", os.O_WRONLY | os.O_CREAT), 1)\nos.write(1, b"c-level\\n")\nprint("python-level")')
  t.same([dup.result.exitCode, dup.result.timedOut, dup.stdout], [0, false, ''])
  t.equal((await run(m, id, 'python', 'os.dup2(saved, 1)\nprint("restored")')).stdout, 'restored\n')
  t.equal(file('dup.txt'), 'c-level\npython-level\n')
  const gone = await run(m, id, 'python', 'os.close(1)\nos.close(2)\nkept + 1')
  t.same([gone.result.exitCode, gone.result.stateLost, gone.results], [0, false, ['2']])

  const js = await run(m, id, 'javascript', 'const fs = require("node:fs")\nfs.closeSync(1)\nfs.closeSync(2)\n41 + 1')
  t.same([js.result.exitCode, js.result.timedOut, js.result.stateLost, js.results], [0, false, false, ['42']])
  t.same((await run(m, id, 'javascript', 'typeof fs')).results, ["'object'"])
})

t.test('an interrupt is never lost, even as the cell starts', async (t) => {
  const m = manager({ execTimeoutMs: 10_000 })
  const id = newSession()
  // Not the shell: bash drops a SIGINT that reaches it while it waits for a child that did not die
  // of it, which happens to about 1 in 100 of these (the child between fork and exec still has
  // bash's handler). Open in issue 11; single interrupts are covered by 'interrupt and abort'.
  for (const [language, setup, code, check] of [
    ['python', 'kept = "yes"', 'import time\ntime.sleep(60)', 'kept'],
    ['javascript', 'var kept = "yes"', 'await new Promise((r) => setTimeout(r, 60_000))', 'kept'],
    ['javascript', 'var kept = "yes"', 'while (true) {}', 'kept'],
  ] as const) {
    await run(m, id, language, setup)
    const outcomes = new Map<string, number>()
    for (let i = 0; i < 100; i++) {
      const pending = m.execute({ tenantId: 'tenant', sessionId: id, language, code })
      while (!(await m.interrupt(id))) await new Promise((r) => setImmediate(r))
      const r = await pending
      const outcome = `interrupted=${r.interrupted} timedOut=${r.timedOut} stateLost=${r.stateLost} error=${r.error?.name}`
      outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1)
    }
    t.same(Object.fromEntries(outcomes), { 'interrupted=true timedOut=false stateLost=false error=KeyboardInterrupt': 100 }, language)
    const after = await run(m, id, language, check)
    t.same(after.results, ["'yes'"], `${language}: the kernel kept its state`)
  }
})

t.test('interactive programs fail at once with a message instead of waiting for a terminal', async (t) => {
  const m = manager({ execTimeoutMs: 10_000 })
  const id = newSession()
  const cases: [Language, string, RegExp][] = [
    ['python', 'import getpass\ngetpass.getpass("password? ")', /password\? /],
    ['shell', 'read -p "name? " answer; echo "read=$?"', /read=1\n/],
    // stdout and stderr are separate streams here: both must show, in whichever order.
    ['shell', 'python3 -c "input()"; echo "child=$?"', /^(?=[\s\S]*EOFError)(?=[\s\S]*child=1\n)/],
    ['shell', 'seq 3 > pager.txt; less pager.txt; more pager.txt; git --no-pager --version >/dev/null; echo "pagers done"', /1\n2\n3\n[\s\S]*pagers done\n/],
    ['shell', 'ssh -o ConnectTimeout=2 user@127.0.0.1 true; echo "ssh=$?"', /ssh=255\n/],
    ['javascript', "const rl = (await import('node:readline')).createInterface({ input: process.stdin }); await new Promise((r) => { rl.question('name? ', r); rl.on('close', () => r('closed')) })", /closed/],
  ]
  for (const [language, code, expected] of cases) {
    const { result, stdout, stderr, results } = await run(m, id, language, code)
    t.equal(result.timedOut, false, `${language}: ${code.slice(0, 40)} does not wait`)
    t.match([stdout, stderr, ...results, result.error?.name ?? ''].join('\n'), expected, `${language}: ${code.slice(0, 40)}`)
  }
  const python = await run(m, id, 'python', 'input("name? ")')
  t.equal(python.result.error?.name, 'EOFError')
  t.match(python.result.error?.value, /not available/, 'input() says why')
})

t.test('figures and images come back as PNG', async (t) => {
  const m = manager()
  const id = newSession()
  const plot = await run(m, id, 'python', 'import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title("t")\nplt.show()')
  t.equal(plot.result.exitCode, 0, plot.stderr)
  t.equal(plot.images.length, 1)
  t.ok(Buffer.from(plot.images[0] ?? '', 'base64').subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])))
  t.same((await run(m, id, 'python', 'len(plt.get_fignums())')).results, ['0'], 'figures are closed once sent')
  const pil = await run(m, id, 'python', 'from PIL import Image\nImage.new("RGB", (8, 8), "red")')
  t.equal(pil.images.length, 1)
  t.same(pil.results, [])
})

t.test('an execution aborted while its kernel starts does not run', async (t) => {
  const m = manager()
  const id = newSession()
  const controller = new AbortController()
  const running = run(m, id, 'python', 'open("ran.txt", "w").write("ran")\nimport time\ntime.sleep(30)', { signal: controller.signal })
  // The kernel of a new session takes several turns of the event loop to start.
  setImmediate(() => controller.abort())
  const { result } = await running
  t.equal(result.interrupted, true)
  t.notOk(existsSync(join(workspacesDir, id, 'ran.txt')), 'the code never ran')
})

t.test('timeouts interrupt first and kill only when needed', async (t) => {
  const m = manager({ execGraceMs: 800 })
  const id = newSession()
  await run(m, id, 'python', 'kept = "still here"')
  const busy = await run(m, id, 'python', 'while True: pass', { timeoutMs: 1000 })
  t.equal(busy.result.timedOut, true)
  t.equal(busy.result.stateLost, false)
  t.equal(busy.result.error?.name, 'KeyboardInterrupt')
  t.match(busy.notices.join(' '), /timed out after 1 s and was interrupted/)
  t.same((await run(m, id, 'python', 'kept')).results, ["'still here'"], 'the kernel is usable afterwards')

  const stubborn = await run(m, id, 'python', 'import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass', { timeoutMs: 1000 })
  t.equal(stubborn.result.timedOut, true)
  t.equal(stubborn.result.stateLost, true)
  t.equal(stubborn.result.exitCode, null)
  t.match(stubborn.notices.join(' '), /did not stop within 0\.8 s of the interrupt, so the kernel was killed/)
  t.same((await run(m, id, 'python', '"kept" in globals()')).results, ['False'], 'a fresh kernel')

  const capped = await run(m, newSession(), 'shell', 'sleep 5', { timeoutMs: 60_000 })
  t.equal(capped.result.timedOut, false, 'the server maximum still applies, but 5 s fits in it')
  const maxed = manager({ execTimeoutMs: 500 })
  const limited = await run(maxed, newSession(), 'shell', 'sleep 5', { timeoutMs: 60_000 })
  t.equal(limited.result.timedOut, true, 'timeoutMs cannot exceed the server maximum')
})

t.test('interrupt and abort', async (t) => {
  const m = manager()
  const id = newSession()
  t.equal(await m.interrupt(id), false, 'nothing to interrupt')
  await run(m, id, 'python', 'kept = 1')
  for (const [language, code] of [
    ['python', 'import time\nprint("go", flush=True)\ntime.sleep(30)'],
    ['shell', 'echo go; sleep 30; echo never'],
    ['shell', 'echo go; while true; do :; done; echo never'],
    ['javascript', 'console.log("go"); while (true) {}'],
    ['javascript', 'console.log("go"); await new Promise((r) => setTimeout(r, 30000))'],
  ] as const) {
    let started: () => void = () => {}
    const going = new Promise<void>((resolve) => {
      started = resolve
    })
    const pending = m.execute({ tenantId: 'tenant', sessionId: id, language, code, onOutput: (o) => o.type === 'stream' && started() })
    await going
    await new Promise((r) => setTimeout(r, 100))
    t.equal(await m.interrupt(id), true)
    const result = await pending
    t.equal(result.interrupted, true, `${language}: ${code}`)
    t.equal(result.stateLost, false)
    t.equal(result.error?.name, 'KeyboardInterrupt')
  }
  t.same((await run(m, id, 'python', 'kept')).results, ['1'])

  const controller = new AbortController()
  setTimeout(() => controller.abort(), 300)
  const aborted = await run(m, id, 'shell', 'sleep 30', { signal: controller.signal })
  t.equal(aborted.result.interrupted, true)
  t.equal(aborted.result.timedOut, false, 'the abort stopped it, not the timeout')
  const already = await run(m, id, 'shell', 'echo never', { signal: AbortSignal.abort() })
  t.equal(already.stdout, '', 'an execution aborted before it starts does not run')
})

t.test('output past the limit is cut and the kernel killed', async (t) => {
  const m = manager({ outputLimitBytes: 1_000_000 })
  const id = newSession()
  const flood = await run(m, id, 'python', 'import sys\nchunk = "x" * 1_000_000\nfor _ in range(100):\n    sys.stdout.write(chunk)')
  t.equal(flood.result.timedOut, false, 'stopped by the cut, not by the timeout')
  t.equal(flood.result.truncated, true)
  t.equal(flood.result.stateLost, true)
  t.ok(flood.stdout.length <= 1_000_000, `${flood.stdout.length} characters forwarded`)
  t.match(flood.notices.join(' '), /Output passed 1000000 bytes and was cut/)
  t.same((await run(m, id, 'python', '1 + 1')).results, ['2'], 'the next execution gets a new kernel')
  await run(m, id, 'python', 'kept = 1')
  const value = await run(m, id, 'python', 'list(range(300_000))')
  t.equal(value.result.truncated, true)
  t.same(value.results, [])
  t.match(value.notices.join(' '), /A value was left out: output passed 1000000 bytes/)
  t.equal(value.result.stateLost, false, 'a value too large to show does not cost the kernel')
  t.same((await run(m, id, 'python', 'kept')).results, ['1'])
})

t.test('a kernel killed from outside is detected and restarted', async (t) => {
  const m = manager()
  const id = newSession()
  await run(m, id, 'python', 'kept = 1')
  const drivers = []
  for (const pid of await descendants(process.pid)) {
    const cmdline = safeCmdline(pid)
    if (cmdline.includes('python_driver.py') && !cmdline.includes('bwrap')) drivers.push(pid)
  }
  t.ok(drivers.length >= 1)
  for (const pid of drivers) process.kill(pid, 'SIGKILL')
  // causal, not timed: the next execution is sent once the manager has seen the exit
  while (m.stats().live > 0) await new Promise((r) => setTimeout(r, 20))
  const after = await run(m, id, 'python', '"kept" in globals()')
  t.match(after.notices.join(' '), /stopped between executions .* and was restarted/)
  t.equal(after.result.stateLost, true, 'the execution after the notice reports the state lost')
  t.same(after.results, ['False'])
})

function safeStat(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8')
  } catch {
    return ''
  }
}

function safeCmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ')
  } catch {
    return ''
  }
}

t.test('one session runs in order, sessions run in parallel', async (t) => {
  const m = manager()
  const a = newSession()
  const b = newSession()
  await Promise.all([run(m, a, 'python', '1'), run(m, a, 'shell', 'true'), run(m, b, 'python', '1')])
  // a1 holds its session until the test releases it, which happens only after b1 has finished:
  // the test completes only if b1 did not wait for session a.
  const release = join(workspacesDir, a, 'release')
  const order: string[] = []
  const tracked = async (id: string, language: Language, code: string, name: string) => {
    const r = await run(m, id, language, code)
    order.push(name)
    return r
  }
  const running = Promise.all([
    tracked(a, 'python', 'import os, time\nwhile not os.path.exists("/workspace/release"):\n    time.sleep(0.01)\nstep = 1', 'a1'),
    tracked(a, 'shell', 'true', 'a2'),
    tracked(a, 'python', 'step + 1', 'a3'),
  ])
  await tracked(b, 'python', '1', 'b1')
  t.same(order, ['b1'], 'the other session did not wait for it')
  writeFileSync(release, '')
  const [, , third] = await running
  t.same(order, ['b1', 'a1', 'a2', 'a3'], 'the session ran its executions one after the other')
  t.same(third?.results, ['2'], 'the third execution saw the first one finished')
})

t.test('least recently used kernels are evicted past maxKernels', async (t) => {
  const m = manager({ maxKernels: 2 })
  const [s1, s2, s3] = [newSession(), newSession(), newSession()]
  await run(m, s1, 'python', 'x = 1')
  await run(m, s2, 'python', 'x = 2')
  await run(m, s1, 'python', 'x')
  await run(m, s3, 'python', 'x = 3')
  await new Promise((r) => setTimeout(r, 200))
  t.equal(m.stats().live, 2)
  const evicted = await run(m, s2, 'python', '"x" in globals()')
  t.match(evicted.notices.join(' '), /stopped to make room for another \(at most 2 kernels run at once on this server\); .*gone/)
  t.same(evicted.results, ['False'])
  t.equal(evicted.result.stateLost, true)
  const kept = await run(m, s3, 'python', 'x')
  t.same(kept.notices, [])
  t.same(kept.results, ['3'])
})

t.test('a tenant at its kernel quota evicts its own kernels, never another tenant\'s', async (t) => {
  const m = manager({ maxKernels: 4, maxKernelsPerTenant: 2 })
  const [a1, a2, a3, b1, c1] = [newSession(), newSession(), newSession(), newSession(), newSession()]
  await run(m, b1, 'python', 'x = "b"', { tenantId: 'b' })
  await run(m, a1, 'python', 'x = "a1"', { tenantId: 'a' })
  await run(m, a2, 'python', 'x = "a2"', { tenantId: 'a' })
  const third = await run(m, a3, 'python', 'x = "a3"', { tenantId: 'a' })
  t.same(third.notices, [], 'the tenant that starts a kernel is not told anything')
  const evicted = await run(m, a1, 'python', '"x" in globals()', { tenantId: 'a' })
  t.match(evicted.notices.join(' '), /this API key runs at most 2 kernels at once/, "tenant a's own oldest kernel made room")
  t.same((await run(m, b1, 'python', 'x', { tenantId: 'b' })).results, ["'b'"], "tenant b's kernel is untouched")

  // The server is full (a: 2, b: 1, and one more for c): c, holding fewer, takes from the tenant holding most.
  await run(m, c1, 'python', 'x = "c"', { tenantId: 'c' })
  const c2 = newSession()
  await run(m, c2, 'python', 'x = "c2"', { tenantId: 'c' })
  t.same((await run(m, b1, 'python', 'x', { tenantId: 'b' })).results, ["'b'"], 'the tenant with the fewest kernels keeps its kernel')

  // Every kernel of a tenant busy: the next one is refused rather than evicting a running one.
  const started: Promise<void>[] = []
  const busy = [a3, a1].map((sessionId) => {
    let going: () => void = () => {}
    started.push(new Promise<void>((resolve) => (going = resolve)))
    return m.execute({ sessionId, tenantId: 'a', language: 'python', code: 'import time\nprint("go", flush=True)\ntime.sleep(2)', onOutput: (o) => o.type === 'stream' && going() })
  })
  await Promise.all(started)
  await t.rejects(m.execute({ sessionId: newSession(), tenantId: 'a', language: 'python', code: '1' }), { statusCode: 429, code: 'kernel_quota_exceeded' })
  await Promise.all(busy)
})

t.test('idle kernels are reaped', async (t) => {
  const m = manager({ idleSeconds: 1 })
  const id = newSession()
  await run(m, id, 'shell', 'X=1')
  t.equal(m.stats().live, 1)
  await new Promise((r) => setTimeout(r, 2200))
  t.equal(m.stats().live, 0)
  const after = await run(m, id, 'shell', 'echo "${X:-unset}"')
  t.match(after.notices.join(' '), /stopped after 1 s without use/)
  t.equal(after.result.stateLost, true)
  t.equal(after.stdout, 'unset\n')
})

t.test('restart and shutdown', async (t) => {
  const m = manager()
  const id = newSession()
  await run(m, id, 'python', 'x = 1')
  await run(m, id, 'shell', 'X=1')
  await m.restart(id, 'python')
  const py = await run(m, id, 'python', '"x" in globals()')
  t.same(py.results, ['False'])
  t.same(py.notices, [], 'a requested restart needs no notice')
  t.equal((await run(m, id, 'shell', 'echo $X')).stdout, '1\n', 'only the named language restarted')
  const running = run(m, id, 'shell', 'sleep 30')
  const queued = run(m, id, 'shell', 'echo queued')
  await new Promise((r) => setTimeout(r, 300))
  await m.shutdownSession(id)
  const cut = await running
  t.equal(cut.result.stateLost, true)
  t.match(cut.notices.join(' '), /shut down while this code was running/)
  const never = await queued
  t.equal(never.stdout, '')
  t.equal(m.stats().live, 0)
})

t.test('the kernel environment is scrubbed and takes the tenant variables', async (t) => {
  process.env.OI_SERVER_ONLY_MARKER = 'server-secret-value'
  t.teardown(() => {
    delete process.env.OI_SERVER_ONLY_MARKER
  })
  const m = manager()
  const id = newSession()
  const env = await run(m, id, 'shell', 'env', { env: { TENANT_TOKEN: 'tenant-value', HOME: '/elsewhere' } })
  t.match(env.stdout, /^TENANT_TOKEN=tenant-value$/m)
  t.match(env.stdout, /^HOME=\/workspace$/m, 'tenant variables cannot replace the kernel ones')
  t.match(env.stdout, /^MPLBACKEND=Agg$/m)
  t.notMatch(env.stdout, /server-secret-value|OI_SERVER_ONLY_MARKER/)
})

t.test('sandbox none runs the same protocol without isolation', async (t) => {
  const m = manager({ sandbox: 'none' })
  const id = newSession()
  await run(m, id, 'python', 'x = 20')
  t.same((await run(m, id, 'python', 'x * 2 + 2')).results, ['42'])
  t.equal((await run(m, id, 'shell', 'cd /tmp; pwd')).stdout, '/tmp\n')
  t.same((await run(m, id, 'javascript', 'await Promise.resolve(1)')).results, ['1'])
  const pending = run(m, id, 'python', 'import time\ntime.sleep(30)')
  await new Promise((r) => setTimeout(r, 300))
  await m.interrupt(id)
  t.equal((await pending).result.error?.name, 'KeyboardInterrupt')
})

t.test('close() leaves no process behind', async (t) => {
  const baseline = new Set(await descendants(process.pid))
  const m = new KernelManager(options())
  const ids = [newSession(), newSession()]
  for (const id of ids) {
    await run(m, id, 'python', '1')
    await run(m, id, 'shell', 'sleep 300 & sleep 300 & true')
    await run(m, id, 'javascript', '1')
  }
  const running = run(m, ids[0] ?? '', 'python', 'import subprocess\nsubprocess.run(["sleep", "300"])')
  await new Promise((r) => setTimeout(r, 300))
  const ours = (await descendants(process.pid)).filter((pid) => !baseline.has(pid))
  t.ok(ours.length >= 10, `${ours.length} kernel processes before close`)
  await m.close()
  t.equal((await running).result.stateLost, true)
  t.same(
    (await descendants(process.pid)).filter((pid) => !baseline.has(pid)),
    [],
    'no kernel process is left',
  )
  t.same(
    ours.filter((pid) => !safeStat(pid).includes(') Z ') && safeStat(pid) !== ''),
    [],
    'not even re-parented ones',
  )
  await t.rejects(m.execute({ tenantId: 'tenant', sessionId: ids[0] ?? '', language: 'python', code: '1' }), { statusCode: 503, code: 'shutting_down' })
})

t.test('invalid requests', async (t) => {
  const m = manager()
  await t.rejects(m.execute({ tenantId: 'tenant', sessionId: '../escape', language: 'python', code: '1' }), { statusCode: 400, code: 'invalid_request' })
  await t.rejects(m.execute({ tenantId: 'tenant', sessionId: newSession(), language: 'cobol' as Language, code: '1' }), { statusCode: 400, code: 'invalid_request' })
})
