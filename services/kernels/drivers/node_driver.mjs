// JavaScript kernel driver: a persistent REPL context with top-level await and declarations that
// survive between cells. Same protocol as the other drivers (protocol.ts): a `BASE64(code)` line
// then a `NONCE` line on fd 8, the nonce read only after the code ran; JSON reports on fd 3; a
// nonce sentinel on fds 1 and 2 after each execution. Runs under plain node, without any
// node_modules.
import fs from 'node:fs'
import { AsyncLocalStorage } from 'node:async_hooks'
import { createRequire } from 'node:module'
import net from 'node:net'
import readline from 'node:readline'
import { PassThrough, Writable } from 'node:stream'
import util from 'node:util'
import vm from 'node:vm'

// Node cannot dup a descriptor, but reopening a pipe through /proc gives a close-on-exec one; the
// inherited 3 and 8 are then closed so that programs started by user code get neither channel.
const reopen = (fd, flags) => {
  const copy = fs.openSync(`/proc/self/fd/${fd}`, flags)
  fs.closeSync(fd)
  return copy
}
const REPORT_FD = reopen(3, 'w')
const COMMAND_FD = reopen(8, 'r')
const OUT_FD = fs.openSync('/proc/self/fd/1', 'w')
const ERR_FD = fs.openSync('/proc/self/fd/2', 'w')
const INTERNAL_FRAME = /^\s+at .*(?:node:internal|node:repl|node:vm|node:domain|sigintHandlersWrap|node_driver\.mjs)/

// Values made by user code come from the REPL context's realm, where `instanceof Object` is false.
const isObject = (value) => (typeof value === 'object' && value !== null) || typeof value === 'function'
const report = (message) => fs.writeSync(REPORT_FD, `${JSON.stringify(message)}\n`)

function describeError(err) {
  if (err instanceof repl.Recoverable) err = err.err
  if (err?.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED')
    return { name: 'KeyboardInterrupt', value: 'Execution interrupted', traceback: '' }
  if (!isObject(err) || !('stack' in err))
    return { name: 'Error', value: `Uncaught ${util.inspect(err)}`, traceback: '' }
  const stack = typeof err.stack === 'string' ? err.stack : `${err.name}: ${err.message}`
  // A syntax error has no frame of the user's: the REPL drops them all too.
  const dropped = err.name === 'SyntaxError' ? /^\s+at / : INTERNAL_FRAME
  const traceback = stack
    .split('\n')
    .filter((line) => !dropped.test(line))
    .join('\n')
  return { name: err.name ?? 'Error', value: String(err.message ?? ''), traceback }
}

// The cell being evaluated, if any: its errors and interrupts settle it.
let settle = null
// Errors thrown by callbacks (timers, events) that the REPL's domain caught: they are not the
// evaluated code's own throw.
const strayErrors = new WeakSet()
// Which cell started the code that is running: promises, timers and callbacks carry the cell
// they were made in, whenever they run.
const cellOrigin = new AsyncLocalStorage()
// The cell whose code is running, and the one whose code has settled but whose execution has not
// ended yet (see LATE_ERROR_GRACE).
let running = null
let settling = null
// Printed before an error that came after its cell had ended.
const BACKGROUND_PREFIX = '[background error] '
const uncaughtText = (value) => {
  const { name, value: message, traceback } = describeError(value)
  return `Uncaught ${traceback || `${name}: ${message}`}`
}

// An uncaught exception or unhandled rejection raised by what a cell started (a callback, an
// un-awaited promise) belongs to that cell: while its code runs it ends the cell, as it would end
// a program; during the cell's grace turn it fails the cell (a second one is printed). Once the
// cell has ended, or for code no cell started, it is printed to stderr as a background error.
function onAsyncError(error) {
  const origin = cellOrigin.getStore()
  if (origin !== undefined && origin === running) return settle(error)
  if (origin !== undefined && origin === settling?.cell) {
    if (settling.failed) return process.stderr.write(`${uncaughtText(error)}\n`)
    Object.assign(settling, { failed: true, error, value: undefined })
    return
  }
  process.stderr.write(`${BACKGROUND_PREFIX}${origin ? `(${origin.file}) ` : ''}${uncaughtText(error)}\n`)
}

// A cell ends once its code has settled and the event loop has gone round once more: promises
// it left rejected without a handler, 0 ms timers and immediates it set have run by then, and
// their errors are its own. A cell that left nothing pending pays one loop turn for it.
const LATE_ERROR_GRACE = () =>
  new Promise((resolve) => setTimeout(() => setImmediate(resolve), 0))

const interruptError = Object.assign(new Error('Execution interrupted'), { code: 'ERR_SCRIPT_EXECUTION_INTERRUPTED' })

// SIGINT belongs to Node's SIGINT watchdog for the driver's whole life, so that no moment is left
// where the signal's default action (termination) applies. Left to itself, the watchdog runs only
// around the synchronous part of each cell, and when it stops Node installs an exit-on-signal
// handler until a `process.on('SIGINT')` listener registers the event loop's again; re-registering
// also drops a signal the loop had caught but not yet dispatched. Started once here and never
// stopped, the watchdog makes the REPL's own start and stop nested ones: a signal during a
// synchronous run stops that run (ERR_SCRIPT_EXECUTION_INTERRUPTED), and any other is kept as
// pending, which `takeSigint` reads and clears. The watchdog is internal to Node (the REPL's
// `breakEvalOnSigint` uses it), hence `--expose-internals`.
const watchdog = (() => {
  const emitWarning = process.emitWarning
  // Requiring the module warns that it is internal; user code must not see that in its output.
  process.emitWarning = () => {}
  try {
    return createRequire(import.meta.url)('internal/test/binding').internalBinding('contextify')
  } finally {
    process.emitWarning = emitWarning
  }
})()
if (!watchdog.startSigintWatchdog()) throw new Error('cannot watch SIGINT')
const takeSigint = () => {
  watchdog.startSigintWatchdog()
  return watchdog.stopSigintWatchdog()
}
const SIGINT_POLL_MS = 20
// The REPL runs a cell's compiled script with vm between its own (nested) start and stop of the
// watchdog, after compiling it, which takes a while. A signal that came during compilation is
// pending, and vm's own watchdog would clear it unseen when the script ends: it is taken here,
// just before the run, and stops the cell instead. The REPL keeps the method it finds when it is
// loaded, hence this wrapper before the REPL is imported.
const runInContext = vm.Script.prototype.runInContext
vm.Script.prototype.runInContext = function (...args) {
  if (settle && takeSigint()) throw interruptError
  return Reflect.apply(runInContext, this, args)
}
const { default: repl } = await import('node:repl')

const output = new PassThrough()
output.resume()
const server = repl.start({
  input: new PassThrough(),
  output,
  terminal: false,
  prompt: '',
  useGlobal: false,
  ignoreUndefined: true,
  breakEvalOnSigint: true,
  // The REPL hands errors thrown by evaluated code to its writer instead of the eval callback.
  writer: (value) => {
    if (settle && !(isObject(value) && strayErrors.has(value))) settle(value)
    else onAsyncError(value)
    return util.inspect(value)
  },
})
// The REPL's own handler erases the mark the domain puts on errors it caught as uncaught.
server._domain.prependListener('error', (err) => {
  if (!isObject(err)) return
  if (err.domainThrown) strayErrors.add(err)
  // Formatted now, with every frame: the REPL's handler would cut the stack at its own frames,
  // which drops the user's frames of a callback. The driver's and Node's are left out later.
  void err.stack
})
// Left in place, the REPL would close itself on a second SIGINT.
server.removeAllListeners('SIGINT')
server.context.console = console

// An interrupt outside a cell (as it starts, while its output is reported) is kept until the
// execution it was meant for ends; a cell that starts with one pending stops at once.
const onSigint = () => {
  if (settle) settle(interruptError)
}
// A SIGINT that came while the REPL ran a cell's synchronous part, after that part had finished.
server.on('SIGINT', onSigint)
// Code may close fds 1 and 2: what is written to them then goes nowhere, as in a terminal,
// instead of raising errors that would be printed to them again.
for (const stream of [process.stdout, process.stderr]) stream.on('error', () => {})
process.on('uncaughtException', onAsyncError)
process.on('unhandledRejection', onAsyncError)

function evaluate(code, cell) {
  let resolve
  const settled = new Promise((r) => {
    resolve = r
  })
  const finish = (error, value, failed) => {
    if (settle !== own) return
    settle = null
    running = null
    resolve({ error, value, failed })
  }
  const own = (error) => finish(error, undefined, true)
  settle = own
  running = cell
  if (takeSigint()) {
    own(interruptError)
    return settled
  }
  // While the cell awaits, an interrupt can only be seen by asking the watchdog.
  const poll = setInterval(() => takeSigint() && onSigint(), SIGINT_POLL_MS)
  settled.finally(() => clearInterval(poll))
  cellOrigin.run(cell, () => server.eval(code, server.context, cell.file, (error, value) => finish(error, value, Boolean(error))))
  return settled
}

// Resolves once what user code wrote to the stream has reached the descriptor (or failed, when
// the code closed it). The stream's own write, in case user code replaced the method.
const drained = (stream) => new Promise((resolve) => Writable.prototype.write.call(stream, '', () => resolve()))

// Static ES module syntax, which models write, as the REPL would run it: each `import`
// declaration at the start of a line becomes a dynamic import assigned to `var`s (kept between
// cells, and imported again without a clash), and `export` keywords are dropped. A line-based
// rewrite, not a parser: an import written inside a template string at the start of a line would
// be rewritten too.
const IMPORT = /^([ \t]*)import\s+(?:([\w$]+)\s*(?:,\s*)?)?(?:\*\s*as\s+([\w$]+)\s*)?(?:\{([^}]*)\}\s*)?from\s*(['"][^'"\n]+['"])[ \t]*(?:with\s*\{[^}]*\}[ \t]*)?;?/gm
const SIDE_EFFECT_IMPORT = /^([ \t]*)import\s*(['"][^'"\n]+['"])[ \t]*;?/gm
const EXPORT_LIST = /^[ \t]*export\s*\{[^}]*\}(?:\s*from\s*['"][^'"\n]+['"])?[ \t]*;?/gm
const EXPORT = /^([ \t]*)export\s+(?:default\s+)?(?=\S)/gm

function rewriteModuleSyntax(code) {
  return code
    .replace(IMPORT, (whole, indent, defaultName, namespace, names, source) => {
      if (!defaultName && !namespace && names === undefined) return whole
      const parts = []
      const bindings = (names ?? '')
        .split(',')
        .map((name) => name.trim())
        .filter(Boolean)
        .map((name) => name.replace(/^([\w$]+|'[^']*'|"[^"]*")\s+as\s+([\w$]+)$/, '$1: $2'))
      if (namespace) {
        parts.push(`var ${namespace} = await import(${source});`)
        if (defaultName) parts.push(`var ${defaultName} = ${namespace}.default;`)
        if (bindings.length > 0) parts.push(`var { ${bindings.join(', ')} } = ${namespace};`)
      } else {
        parts.push(`var { ${[...(defaultName ? [`default: ${defaultName}`] : []), ...bindings].join(', ')} } = await import(${source});`)
      }
      return indent + parts.join(' ')
    })
    .replace(SIDE_EFFECT_IMPORT, (_, indent, source) => `${indent}await import(${source});`)
    .replace(EXPORT_LIST, '')
    .replace(EXPORT, '$1')
}

async function execute(code, file, nextLine) {
  const cell = { file }
  const outcome = { cell, ...(await evaluate(rewriteModuleSyntax(code), cell)) }
  settling = outcome
  await LATE_ERROR_GRACE()
  settling = null
  const { error, value, failed } = outcome
  let exitCode = 0
  if (failed) {
    const described = describeError(error)
    report({ type: 'error', ...described })
    exitCode = described.name === 'KeyboardInterrupt' ? 130 : 1
  } else if (value !== undefined) {
    report({ type: 'result', text: util.inspect(value) })
  }
  const nonce = ((await nextLine()) ?? '').trim()
  const sentinel = `\x02oi-end:${nonce}\x03`
  await Promise.all([drained(process.stdout), drained(process.stderr)])
  fs.writeSync(OUT_FD, sentinel)
  fs.writeSync(ERR_FD, sentinel)
  takeSigint()
  report({ type: 'done', nonce, exit_code: exitCode })
}

report({ type: 'ready', version: process.versions.node, pid: process.pid })
const lines = readline.createInterface({ input: new net.Socket({ fd: COMMAND_FD, readable: true, writable: false }), crlfDelay: Infinity })
const commands = lines[Symbol.asyncIterator]()
const nextLine = async () => {
  const { value, done } = await commands.next()
  return done ? undefined : value
}
for (let count = 1; ; count++) {
  const payload = await nextLine()
  if (payload === undefined) break
  // Flags after the code (`active_lines`) ask for reports this driver does not make.
  await execute(Buffer.from(payload.trim().split(' ')[0], 'base64').toString('utf8'), `cell-${count}`, nextLine)
}
process.exit(0)
