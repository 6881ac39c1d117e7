import type { ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { constants } from 'node:os'
import type { Readable } from 'node:stream'
import { StringDecoder } from 'node:string_decoder'
import { descendants, hostPidOf, waitGone } from './processes.js'
import type { KernelCgroup } from './cgroups.js'
import { commandLines, LineSplitter, parseReport, type Report, SentinelScanner, sentinel } from './protocol.js'
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
  reports: number
  onOutput: (output: KernelOutput) => void
  /** Lines in the cell when it asked for `line` reports (others are ignored), else 0. */
  lines: number
  lastLine: number
  error?: ExecError
  done: boolean
  exitCode: number | null
  pendingSentinels: Set<StreamName>
  resolve: (outcome: RunOutcome) => void
}

/** Why a kernel was stopped for what it wrote on its report channel. */
export const PROTOCOL_VIOLATION = 'protocol violation'
// Reports of one execution: a value, an error, the images of its figures. Far more is a flood.
const MAX_REPORTS_PER_EXECUTION = 10_000
// Output written between executions (by background jobs), up to this much until the next one.
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
  /**
   * Output written while no execution is running (background jobs, timers of earlier cells):
   * handed over as it comes, up to IDLE_OUTPUT_BYTES between two executions, then one notice.
   * Without a listener it is held and shown with the next execution.
   */
  onBackgroundOutput: ((output: KernelOutput) => void) | undefined

  private readonly proc: ChildProcess
  private readonly pid: number | undefined
  private driverPid: number | undefined
  private active: ActiveRun | undefined
  private idleOutput: { stream: StreamName; bytes: Buffer }[] = []
  private idleBytes = 0
  private idleCut = false
  private readonly decoders = { stdout: new StringDecoder('utf8'), stderr: new StringDecoder('utf8') }
  private readonly scanners: Record<StreamName, SentinelScanner>
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined
  private readonly finished: Promise<void>
  private stderrHead = ''
  private readonly reportLines: LineSplitter
  private oomKilled = false
  private readyReceived = false
  private onReady: ((report: ReadyReport) => void) | undefined

  /**
   * @param maxReportLineBytes longest report line (an image travels as one base64 line); a longer
   *   one stops the kernel instead of being buffered.
   * @param cgroup the kernel's control group: its processes are killed with the kernel and the
   *   group is removed once they are gone.
   */
  constructor(
    spec: KernelCommand,
    private readonly log: KernelLogger,
    private readonly label: string,
    maxReportLineBytes: number,
    private readonly cgroup?: KernelCgroup,
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
    this.reportLines = new LineSplitter(
      maxReportLineBytes,
      (line) => this.onReportLine(line),
      () => this.breakProtocol(`it reported a value or an image of more than ${maxReportLineBytes} bytes`),
    )
    reports.on('data', (chunk: Buffer) => this.reportLines.push(chunk))
    for (const stream of [this.proc.stdin, stdout, stderr, reports]) {
      stream?.on('error', (err) => this.log.warn({ kernel: this.label, err }, 'kernel pipe error'))
    }

    const exited = new Promise<void>((resolve) => {
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

    this.finished = exited.then(() => this.removeCgroup())
    this.ready = this.waitReady()
  }

  get alive(): boolean {
    return this.exit === undefined
  }

  /** Running code, or still starting: not a candidate for eviction. */
  get busy(): boolean {
    return this.active !== undefined || (this.alive && !this.readyReceived)
  }

  /**
   * Runs one piece of code; output goes to `onOutput` while it runs. With `activeLines`, the
   * driver also reports the running line, delivered as `active_line` outputs.
   */
  run(code: string, onOutput: (output: KernelOutput) => void, activeLines = false): Promise<RunOutcome> {
    if (!this.alive) return Promise.resolve({ exited: true, exitCode: this.exit?.code ?? null, signal: this.exit?.signal ?? null })
    if (this.active) throw new Error('kernel is already running code')
    const nonce = randomBytes(16).toString('hex')
    this.lastUsed = Date.now()
    return new Promise((resolve) => {
      const lines = activeLines ? code.split('\n').length : 0
      this.active = { nonce, reports: 0, onOutput, lines, lastLine: 0, done: false, exitCode: null, pendingSentinels: new Set(['stdout', 'stderr']), resolve }
      for (const { stream, bytes } of this.idleOutput) this.deliver(stream, bytes)
      this.idleOutput = []
      this.idleBytes = 0
      this.idleCut = false
      const marker = sentinel(nonce)
      this.scanners.stdout.expect(marker)
      this.scanners.stderr.expect(marker)
      this.proc.stdin?.write(commandLines(nonce, code, activeLines))
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
      tree = [...new Set([root, ...(await descendants(root)), ...((await this.cgroup?.pids()) ?? [])])]
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

  /** What the kernel wrote on its report channel that no driver writes, when it was stopped for it. */
  violation: string | undefined

  /**
   * The report channel carried something no driver writes: code in the kernel is tampering with
   * it. The kernel is stopped, which also ends whatever it was flooding the server with.
   */
  private breakProtocol(what: string): void {
    if (this.killReason !== undefined) return
    this.violation = what
    this.reportLines.stop()
    this.log.warn({ kernel: this.label, what }, 'kernel broke the report protocol and is stopped')
    void this.kill(PROTOCOL_VIOLATION)
  }

  private onReportLine(line: string): void {
    const run = this.active
    if (!this.readyReceived) {
      const ready = parseReport(line)
      if (ready?.type === 'ready') this.onReady?.(ready)
      else this.breakProtocol('something other than its driver wrote to its report channel')
      return
    }
    // Only a running execution has reports; between executions there is nothing to report.
    if (!run) return this.breakProtocol('something wrote to its report channel while no code was running')
    const report = parseReport(line)
    if (report?.type === 'line') {
      // Not counted as reports: a loop reports its lines on every pass. A line the cell does not
      // have, or one nobody asked for, is ignored (user code can reach the reporter and lie).
      if (report.line <= run.lines && report.line !== run.lastLine) {
        run.lastLine = report.line
        run.onOutput({ type: 'active_line', line: report.line })
      }
      return
    }
    if (++run.reports > MAX_REPORTS_PER_EXECUTION) return this.breakProtocol(`more than ${MAX_REPORTS_PER_EXECUTION} reports (values, images, errors) in one execution`)
    if (!report) return
    switch (report.type) {
      case 'ready':
        return
      case 'done':
        // Not ours: the code cannot know the nonce, so this is a forgery, and it ends nothing.
        if (report.nonce !== run.nonce) return
        run.done = true
        run.exitCode = report.exitCode
        this.completeIfDone()
        return
      case 'error':
        run.error ??= { name: report.name, value: report.value, traceback: report.traceback }
        return
      case 'image':
        run.onOutput({ type: 'image', format: report.format, data: report.data })
        return
      case 'result':
        run.onOutput({ type: 'result', text: report.text })
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
    if (this.idleBytes + bytes.length > IDLE_OUTPUT_BYTES) {
      if (!this.idleCut && this.onBackgroundOutput) this.onBackgroundOutput({ type: 'notice', text: `Output written between executions passed ${IDLE_OUTPUT_BYTES} bytes; the rest until the next execution was dropped.` })
      this.idleCut = true
      return
    }
    this.idleBytes += bytes.length
    if (!this.onBackgroundOutput) {
      this.idleOutput.push({ stream, bytes: Buffer.from(bytes) })
      return
    }
    const text = this.decoders[stream].write(bytes)
    if (text) this.onBackgroundOutput({ type: 'stream', stream, text })
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

  private async removeCgroup(): Promise<void> {
    if (!this.cgroup) return
    this.oomKilled = await this.cgroup.oomKilled()
    const failure = await this.cgroup.remove()
    if (failure) this.log.warn({ kernel: this.label, err: failure }, 'kernel cgroup not removed')
  }

  /** Once the kernel is gone: whether its memory limit was reached and the OOM killer ran in its group. */
  async outOfMemory(): Promise<boolean> {
    await this.finished
    return this.oomKilled
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
