import type { ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { constants } from 'node:os'
import type { Readable } from 'node:stream'
import { StringDecoder } from 'node:string_decoder'
import { descendants, hostPidOf, waitGone } from './processes.js'
import { commandLine, LineSplitter, parseReport, type Report, SentinelScanner, sentinel } from './protocol.js'
import { type KernelCommand, spawnKernelCommand } from './sandbox.js'
import type { ExecError, KernelOutput } from './types.js'

export interface KernelLogger {
  info(obj: object, msg?: string): void
  warn(obj: object, msg?: string): void
  error(obj: object, msg?: string): void
}

/** How one execution ended, as far as the kernel process can tell. */
export interface RunOutcome {
  /** The process ended before the execution completed. */
  exited: boolean
  exitCode: number | null
  signal: NodeJS.Signals | null
  error?: ExecError
}

export interface KernelExit {
  code: number | null
  signal: NodeJS.Signals | null
  /** An execution was in progress: its caller hears about the exit from `run`. */
  duringRun: boolean
  /** The manager asked for it (`kill`). */
  requested: boolean
}

type StreamName = 'stdout' | 'stderr'
type ReadyReport = Extract<Report, { type: 'ready' }>

interface ActiveRun {
  nonce: string
  onOutput: (output: KernelOutput) => void
  error?: ExecError
  done: boolean
  exitCode: number | null
  pendingSentinels: Set<StreamName>
  resolve: (outcome: RunOutcome) => void
}

// Images travel on fd 3 as one base64 line: room for large figures, but not for unbounded junk.
const MAX_REPORT_LINE_BYTES = 64 * 1024 * 1024
// Output written between executions (by background jobs) is shown with the next one, up to this.
const IDLE_OUTPUT_BYTES = 64 * 1024
const START_TIMEOUT_MS = 30_000
// After the process exits, how long to wait for its pipes to drain when a leftover grandchild
// keeps them open.
const PIPE_DRAIN_MS = 200
const KILL_WAIT_MS = 3_000
const STDERR_KEPT_BYTES = 4096

/** One kernel process: a driver for one language in one session's sandbox. */
export class Kernel {
  readonly ready: Promise<void>
  lastUsed = Date.now()
  killReason: string | undefined
  onExit: ((exit: KernelExit) => void) | undefined

  private readonly proc: ChildProcess
  private readonly pid: number | undefined
  private driverPid: number | undefined
  private active: ActiveRun | undefined
  private idleOutput: { stream: StreamName; bytes: Buffer }[] = []
  private idleBytes = 0
  private readonly decoders = { stdout: new StringDecoder('utf8'), stderr: new StringDecoder('utf8') }
  private readonly scanners: Record<StreamName, SentinelScanner>
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined
  private readonly finished: Promise<void>
  private stderrHead = ''
  private readyReceived = false
  private onReady: ((report: ReadyReport) => void) | undefined

  constructor(
    spec: KernelCommand,
    private readonly log: KernelLogger,
    private readonly label: string,
  ) {
    this.proc = spawnKernelCommand(spec, ['pipe', 'pipe', 'pipe', 'pipe'])
    this.pid = this.proc.pid
    this.scanners = {
      stdout: new SentinelScanner(
        (bytes) => this.deliver('stdout', bytes),
        () => this.sentinelSeen('stdout'),
      ),
      stderr: new SentinelScanner(
        (bytes) => this.deliver('stderr', bytes),
        () => this.sentinelSeen('stderr'),
      ),
    }
    const stdout = this.proc.stdout as Readable
    const stderr = this.proc.stderr as Readable
    const reports = this.proc.stdio[3] as Readable
    stdout.on('data', (chunk: Buffer) => this.scanners.stdout.push(chunk))
    stderr.on('data', (chunk: Buffer) => {
      if (!this.readyReceived && this.stderrHead.length < STDERR_KEPT_BYTES) this.stderrHead += chunk.toString('utf8').slice(0, STDERR_KEPT_BYTES)
      this.scanners.stderr.push(chunk)
    })
    const lines = new LineSplitter(
      MAX_REPORT_LINE_BYTES,
      (line) => this.onReportLine(line),
      (bytes) => this.log.warn({ kernel: this.label, bytes }, 'kernel report line too long, dropped'),
    )
    reports.on('data', (chunk: Buffer) => lines.push(chunk))
    for (const stream of [this.proc.stdin, stdout, stderr, reports]) {
      stream?.on('error', (err) => this.log.warn({ kernel: this.label, err }, 'kernel pipe error'))
    }

    this.finished = new Promise((resolve) => {
      let drainTimer: NodeJS.Timeout | undefined
      const finish = () => {
        clearTimeout(drainTimer)
        if (this.exit) return
        this.exit = { code: this.proc.exitCode, signal: this.proc.signalCode }
        this.onProcessEnd()
        for (const stream of [this.proc.stdin, stdout, stderr, reports]) stream?.destroy()
        resolve()
      }
      this.proc.once('close', finish)
      this.proc.once('exit', () => {
        drainTimer = setTimeout(finish, PIPE_DRAIN_MS)
      })
      this.proc.once('error', (err) => {
        this.stderrHead ||= err.message
        finish()
      })
    })

    this.ready = this.waitReady()
  }

  get alive(): boolean {
    return this.exit === undefined
  }

  /** Running code, or still starting: not a candidate for eviction. */
  get busy(): boolean {
    return this.active !== undefined || (this.alive && !this.readyReceived)
  }

  /** Runs one piece of code; output goes to `onOutput` while it runs. */
  run(code: string, onOutput: (output: KernelOutput) => void): Promise<RunOutcome> {
    if (!this.alive) return Promise.resolve({ exited: true, exitCode: this.exit?.code ?? null, signal: this.exit?.signal ?? null })
    if (this.active) throw new Error('kernel is already running code')
    const nonce = randomBytes(16).toString('hex')
    this.lastUsed = Date.now()
    return new Promise((resolve) => {
      this.active = { nonce, onOutput, done: false, exitCode: null, pendingSentinels: new Set(['stdout', 'stderr']), resolve }
      for (const { stream, bytes } of this.idleOutput) this.deliver(stream, bytes)
      this.idleOutput = []
      this.idleBytes = 0
      const marker = sentinel(nonce)
      this.scanners.stdout.expect(marker)
      this.scanners.stderr.expect(marker)
      this.proc.stdin?.write(commandLine(nonce, code))
    })
  }

  /** SIGINT to the driver's process group: the code in progress stops, the kernel stays. */
  interrupt(): void {
    const target = this.driverPid ?? this.pid
    if (target === undefined || !this.alive) return
    try {
      process.kill(-target, 'SIGINT')
    } catch {
      try {
        process.kill(target, 'SIGINT')
      } catch {
        // Already gone.
      }
    }
  }

  /** Kills the kernel and every process it started; resolves once they are all gone. */
  async kill(reason: string): Promise<void> {
    this.killReason ??= reason
    const root = this.pid
    let tree: number[] = []
    if (this.alive && root !== undefined) {
      // The snapshot comes first: once killed, escaped children would be re-parented out of sight.
      tree = [root, ...(await descendants(root))]
      for (const target of [-root, ...(this.driverPid === undefined ? [] : [-this.driverPid]), ...tree]) {
        try {
          process.kill(target, 'SIGKILL')
        } catch {
          // Already gone.
        }
      }
    }
    await this.finished
    if (!(await waitGone(tree, KILL_WAIT_MS))) this.log.warn({ kernel: this.label }, 'kernel processes still alive after SIGKILL')
  }

  private async waitReady(): Promise<void> {
    const readyReport = new Promise<ReadyReport>((resolve) => {
      this.onReady = resolve
    })
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), START_TIMEOUT_MS)
    })
    const outcome = await Promise.race([readyReport, this.finished.then(() => 'exited' as const), timeout])
    clearTimeout(timer)
    if (typeof outcome === 'object') {
      this.readyReceived = true
      // Interrupting needs the driver's host pid: it differs from ours inside a pid namespace.
      if (outcome.pid !== null && this.pid !== undefined) this.driverPid = await hostPidOf(this.pid, outcome.pid)
      if (this.driverPid === undefined) this.log.warn({ kernel: this.label }, 'kernel driver process not found; an interrupt will stop the kernel')
      return
    }
    if (outcome === 'timeout') await this.kill('start timeout')
    const detail = this.stderrHead.trim() || (outcome === 'timeout' ? 'no ready message in time' : `exit code ${this.exit?.code}, signal ${this.exit?.signal}`)
    throw new Error(`kernel did not start: ${detail}`)
  }

  private onReportLine(line: string): void {
    const report = parseReport(line)
    if (!report) {
      this.log.warn({ kernel: this.label, line: line.slice(0, 200) }, 'invalid kernel report ignored')
      return
    }
    const run = this.active
    switch (report.type) {
      case 'ready':
        this.onReady?.(report)
        return
      case 'done':
        if (!run || report.nonce !== run.nonce) {
          this.log.warn({ kernel: this.label }, 'kernel reported the end of an execution it was not running')
          return
        }
        run.done = true
        run.exitCode = report.exitCode
        this.completeIfDone()
        return
      case 'error':
        if (run && !run.error) run.error = { name: report.name, value: report.value, traceback: report.traceback }
        return
      case 'image':
        run?.onOutput({ type: 'image', format: report.format, data: report.data })
        return
      case 'result':
        run?.onOutput({ type: 'result', text: report.text })
        return
    }
  }

  private deliver(stream: StreamName, bytes: Buffer): void {
    const run = this.active
    if (run?.pendingSentinels.has(stream)) {
      const text = this.decoders[stream].write(bytes)
      if (text) run.onOutput({ type: 'stream', stream, text })
      return
    }
    if (this.idleBytes + bytes.length > IDLE_OUTPUT_BYTES) return
    this.idleBytes += bytes.length
    this.idleOutput.push({ stream, bytes: Buffer.from(bytes) })
  }

  private sentinelSeen(stream: StreamName): void {
    const run = this.active
    if (!run) return
    const text = this.decoders[stream].end()
    if (text) run.onOutput({ type: 'stream', stream, text })
    run.pendingSentinels.delete(stream)
    this.completeIfDone()
  }

  private completeIfDone(): void {
    const run = this.active
    if (!run || !run.done || run.pendingSentinels.size > 0) return
    this.active = undefined
    this.lastUsed = Date.now()
    run.resolve({ exited: false, exitCode: run.exitCode, signal: null, error: run.error })
  }

  private onProcessEnd(): void {
    this.scanners.stdout.flush()
    this.scanners.stderr.flush()
    const run = this.active
    this.active = undefined
    const code = this.exit?.code ?? null
    const signal = this.exit?.signal ?? null
    if (run) {
      for (const stream of ['stdout', 'stderr'] as const) {
        const text = this.decoders[stream].end()
        if (text) run.onOutput({ type: 'stream', stream, text })
      }
      run.resolve({ exited: true, exitCode: code ?? (signal ? 128 + constants.signals[signal] : null), signal, error: run.error })
    }
    this.onExit?.({ code, signal, duringRun: run !== undefined, requested: this.killReason !== undefined })
  }
}
