import { lstat, mkdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { performance } from 'node:perf_hooks'
import { ApiError, invalidRequest } from '../errors.js'
import { workspaceUsage } from '../workspaces.js'
import { Kernel, type KernelExit, type KernelLogger, PROTOCOL_VIOLATION, type RunOutcome } from './kernel.js'
import { detectLanguages, LANGUAGES } from './languages.js'
import { buildKernelCommand, chownWorkspace, SandboxRuntime, type SandboxEnforcement, UidAllocator } from './sandbox.js'
import type { BackgroundOutput, ExecResult, ExecuteRequest, KernelManagerOptions, KernelOutput, Language, LanguageInfo } from './types.js'

export { resolveLanguage } from './languages.js'

// Session ids name workspace directories: nothing that could climb out of the workspaces root.
const SESSION_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/
// Notices wait for a session's next execution; sessions that never come back must not pile up.
const MAX_PENDING_NOTICES = 10_000
const NAMES: Record<Language, string> = { python: 'Python', shell: 'shell', javascript: 'JavaScript' }
const STATE_GONE = 'variables, imports and everything else from earlier executions are gone'
// How often the workspace's disk use is measured while code runs.
const QUOTA_CHECK_MS = 1000

const silentLogger: KernelLogger = { info() {}, warn() {}, error() {} }
const noop = () => {}
const keyOf = (sessionId: string, language: Language) => `${sessionId}\u0000${language}`
const sessionOf = (key: string) => key.slice(0, key.indexOf('\u0000'))
const languageOf = (key: string) => key.slice(key.indexOf('\u0000') + 1) as Language
const seconds = (ms: number) => `${Number((ms / 1000).toFixed(1))} s`
const closedError = () => new ApiError(503, 'unavailable_error', 'shutting_down', 'The server is shutting down')

function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  if (signal) return `killed by ${signal}`
  // 137 is how a sandbox reports a kernel that died of SIGKILL, usually the kernel's OOM killer.
  return code === 137 ? 'exit code 137, killed, possibly out of memory' : `exit code ${code}`
}

interface Running {
  interrupt(): void
}

/**
 * Runs code for sessions in long-lived kernels: one process per (session, language), started on
 * first use, fed one execution at a time in arrival order per session, while different sessions
 * run in parallel. Idle kernels are stopped, and at most `maxKernels` live at once.
 */
export class KernelManager {
  private readonly opts: KernelManagerOptions
  // Insertion order is use order: the first entry is the least recently used kernel.
  private readonly kernels = new Map<string, Kernel>()
  // The tenant of every kernel, those still starting included.
  private readonly tenants = new Map<string, string>()
  private readonly uids = new UidAllocator()
  private readonly queues = new Map<string, Promise<void>>()
  // Bumped by shutdownSession so executions already queued for the session do not start kernels again.
  private readonly epochs = new Map<string, number>()
  private readonly running = new Map<string, Running>()
  private readonly notices = new Map<string, string>()
  /**
   * The workspace measured after a session's last execution, for its next one to report. The
   * walk costs about as much as a small execution, so it runs after the answer, not before.
   */
  private readonly workspaceChecks = new Map<string, Promise<string | undefined>>()
  private readonly dying = new Set<Promise<void>>()
  private runtime: Promise<SandboxRuntime> | undefined
  private languageInfo: Promise<LanguageInfo[]> | undefined
  private readonly reaper: NodeJS.Timeout | undefined
  private closing: Promise<void> | undefined
  /**
   * Receives what kernels write while none of their executions runs: output of background jobs,
   * and errors raised by code of a cell that had already ended (JavaScript prints those to stderr
   * prefixed `[background error] (cell-N) `). Unset, that output is shown with the session's
   * next execution instead.
   */
  onBackgroundOutput: ((background: BackgroundOutput) => void) | undefined

  constructor(
    opts: KernelManagerOptions,
    private readonly log: KernelLogger = silentLogger,
  ) {
    // Kernels run with the workspace as their cwd: a relative root would resolve inside it.
    this.opts = { ...opts, workspacesDir: resolve(opts.workspacesDir) }
    if (opts.idleSeconds > 0) this.reaper = setInterval(() => this.reapIdle(), Math.min(opts.idleSeconds * 500, 30_000)).unref()
  }

  async execute(req: ExecuteRequest): Promise<ExecResult> {
    if (!SESSION_ID.test(req.sessionId)) throw invalidRequest('Invalid session id', 'session_id')
    if (!LANGUAGES.includes(req.language)) throw invalidRequest(`Unsupported language: ${req.language}`, 'language')
    if (this.closing) throw closedError()
    const sessionId = req.sessionId
    const epoch = this.epochs.get(sessionId) ?? 0
    const result = (this.queues.get(sessionId) ?? Promise.resolve()).then(() => this.runQueued(req, epoch))
    const tail = result.then(noop, noop)
    this.queues.set(sessionId, tail)
    void tail.then(() => {
      if (this.queues.get(sessionId) !== tail) return
      this.queues.delete(sessionId)
      this.epochs.delete(sessionId)
    })
    return result
  }

  /** Interrupts the execution running in the session, if any (killing the kernel after the grace period). */
  async interrupt(sessionId: string): Promise<boolean> {
    const running = this.running.get(sessionId)
    running?.interrupt()
    return running !== undefined
  }

  /** Stops the session's kernel for `language` (all of them without one); the next execution starts afresh. */
  async restart(sessionId: string, language?: Language): Promise<void> {
    await this.stopSession(sessionId, language, 'restart')
  }

  async shutdownSession(sessionId: string): Promise<void> {
    if (this.queues.has(sessionId)) this.epochs.set(sessionId, (this.epochs.get(sessionId) ?? 0) + 1)
    this.workspaceChecks.delete(sessionId)
    await this.stopSession(sessionId, undefined, 'shutdown')
  }

  /** Kills every kernel and waits until none of their processes is left. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      clearInterval(this.reaper)
      for (const [key, kernel] of this.kernels) void this.retire(key, kernel, 'close')
      await Promise.all(this.dying)
      this.notices.clear()
      await Promise.all(this.workspaceChecks.values())
      this.workspaceChecks.clear()
      const runtime = await this.runtime?.catch(() => undefined)
      await runtime?.close()
    })()
    return this.closing
  }

  /** What isolates the kernels on this host (sandbox, seccomp, cgroups, tmpfs sizes, rlimits). */
  async enforcement(): Promise<SandboxEnforcement> {
    return (await this.sandboxRuntime()).enforcement
  }

  /**
   * The session's kernels are gone with their state outside this process (its previous owner
   * replica stopped): the next execution of each language says so and reports `stateLost`.
   */
  markStateLost(sessionId: string, why: string): void {
    for (const language of LANGUAGES) {
      const key = keyOf(sessionId, language)
      if (!this.kernels.has(key)) this.setNotice(key, `${why}; ${STATE_GONE}.`)
    }
  }

  /** Whether any kernel of the session is alive (or starting). */
  hasKernels(sessionId: string): boolean {
    return LANGUAGES.some((language) => this.tenants.has(keyOf(sessionId, language)))
  }

  /** The uid the session's kernels run as, while it has live kernels and the server is root. */
  uidOf(sessionId: string): number | undefined {
    return this.uids.uidOf(sessionId)
  }

  private sandboxRuntime(): Promise<SandboxRuntime> {
    if (this.closing && !this.runtime) return Promise.reject(closedError())
    this.runtime ??= SandboxRuntime.create(this.opts, this.log)
    return this.runtime
  }

  languages(): Promise<LanguageInfo[]> {
    this.languageInfo ??= detectLanguages(this.opts)
    return this.languageInfo
  }

  stats(): { live: number } {
    return { live: this.kernels.size }
  }

  private async runQueued(req: ExecuteRequest, epoch: number): Promise<ExecResult> {
    const started = performance.now()
    const result: ExecResult = { exitCode: null, durationMs: 0, timedOut: false, stateLost: false, truncated: false, interrupted: false }
    const emit = (output: KernelOutput) => {
      try {
        req.onOutput?.(output)
      } catch (err) {
        this.log.warn({ err }, 'onOutput callback failed')
      }
    }
    if (this.closing) throw closedError()
    const checked = this.workspaceChecks.get(req.sessionId)
    if (checked) {
      this.workspaceChecks.delete(req.sessionId)
      const notice = await checked
      if (notice) emit({ type: 'notice', text: notice })
    }
    if ((this.epochs.get(req.sessionId) ?? 0) !== epoch) {
      emit({ type: 'notice', text: "The session's kernels were shut down before this code could run." })
      result.interrupted = true
    } else if (req.signal?.aborted) {
      result.interrupted = true
    } else {
      const key = keyOf(req.sessionId, req.language)
      const kernel = await this.kernelFor(key, req, emit, result)
      // An abort while the kernel started came before runOn listens for one: the code must not run.
      if (req.signal?.aborted) result.interrupted = true
      else await this.runOn(key, kernel, req, emit, result)
    }
    result.durationMs = Math.round(performance.now() - started)
    return result
  }

  private async kernelFor(key: string, req: ExecuteRequest, emit: (output: KernelOutput) => void, result: ExecResult): Promise<Kernel> {
    const notice = this.notices.get(key)
    if (notice !== undefined) {
      // Every pending notice tells of a kernel that went with its state since the last execution.
      this.notices.delete(key)
      result.stateLost = true
      emit({ type: 'notice', text: notice })
    }
    const existing = this.kernels.get(key)
    if (existing) {
      this.kernels.delete(key)
      this.kernels.set(key, existing)
      return existing
    }
    this.evictForRoom(req.tenantId)
    // Counted from now on, so concurrent starts of one tenant cannot pass its quota together.
    this.tenants.set(key, req.tenantId)
    return this.startKernel(key, req)
  }

  private async startKernel(key: string, req: ExecuteRequest): Promise<Kernel> {
    let kernel: Kernel | undefined
    try {
      const runtime = await this.sandboxRuntime()
      const uid = this.uids.acquire(req.sessionId)
      const workspace = await this.prepareWorkspace(req.sessionId, uid)
      const cgroup = await runtime.cgroups.create(`${req.sessionId}-${req.language}`, {
        memoryBytes: this.opts.memoryMb * 1024 * 1024,
        maxProcesses: this.opts.maxProcesses,
        cpuWeight: 100,
      })
      const spec = await buildKernelCommand(this.opts, runtime, { language: req.language, workspace, uid, env: req.env, cgroup })
      if (this.closing) {
        await cgroup?.remove()
        throw closedError()
      }
      // A value or an image travels as one line: room for any the output limit lets through, and
      // for larger ones to be left out with a notice rather than cost the kernel.
      const maxReportLineBytes = Math.max(16 * 1024 * 1024, Math.ceil((this.opts.outputLimitBytes * 4) / 3) + 64 * 1024)
      const started = new Kernel(spec, this.log, `${req.sessionId}/${req.language}`, maxReportLineBytes, cgroup)
      kernel = started
      this.kernels.set(key, started)
      started.onExit = (exit) => this.onKernelExit(key, started, req.language, exit)
      started.onBackgroundOutput = (output) => this.onBackgroundOutput?.({ sessionId: req.sessionId, tenantId: req.tenantId, language: req.language, output })
      await started.ready
      return started
    } catch (err) {
      if (kernel && this.kernels.get(key) === kernel) this.forget(key)
      if (!kernel) {
        this.tenants.delete(key)
        this.releaseUidIfIdle(req.sessionId)
      }
      this.notices.delete(key)
      if (err instanceof ApiError) throw err
      if (this.closing) throw closedError()
      this.log.error({ err, sessionId: req.sessionId, language: req.language }, 'kernel failed to start')
      throw new ApiError(503, 'unavailable_error', 'kernel_unavailable', `The ${NAMES[req.language]} kernel could not start`)
    }
  }

  private async prepareWorkspace(sessionId: string, uid: number | undefined): Promise<string> {
    await mkdir(this.opts.workspacesDir, { recursive: true, mode: 0o700 })
    const dir = join(this.opts.workspacesDir, sessionId)
    await mkdir(dir, { mode: 0o700 }).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err
    })
    const stat = await lstat(dir)
    if (!stat.isDirectory()) throw new Error(`workspace ${dir} is not a directory`)
    // Files put there by the server (uploads) belong to root until the kernel's user takes them over.
    if (uid !== undefined && stat.uid !== uid) await chownWorkspace(dir, uid)
    return dir
  }

  private async runOn(key: string, kernel: Kernel, req: ExecuteRequest, emit: (output: KernelOutput) => void, result: ExecResult): Promise<void> {
    const { execGraceMs, execTimeoutMs, outputLimitBytes } = this.opts
    const timeoutMs = Math.max(1, Math.min(req.timeoutMs ?? execTimeoutMs, execTimeoutMs))
    let forwarded = 0
    let graceTimer: NodeJS.Timeout | undefined
    let killing: Promise<void> | undefined
    const kill = (reason: string) => {
      killing ??= this.retire(key, kernel, reason)
    }
    const stop = () => {
      if (graceTimer || killing) return
      kernel.interrupt()
      graceTimer = setTimeout(() => kill('no stop after interrupt'), execGraceMs)
    }
    let streamCut = false
    const onOutput = (output: KernelOutput) => {
      if (streamCut) return
      if (output.type === 'active_line') return emit(output)
      const size = output.type === 'image' ? output.data.length : Buffer.byteLength(output.text)
      if (forwarded + size <= outputLimitBytes) {
        forwarded += size
        return emit(output)
      }
      // A value or an image is already complete: leaving it out is enough. A stream would keep
      // coming, so the kernel that writes it is stopped.
      if (output.type === 'result' || output.type === 'image') {
        const what = output.type === 'image' ? 'An image' : 'A value'
        if (!result.truncated) emit({ type: 'notice', text: `${what} was left out: output passed ${outputLimitBytes} bytes.` })
        result.truncated = true
        return
      }
      streamCut = true
      result.truncated = true
      emit({ type: 'notice', text: `Output passed ${outputLimitBytes} bytes and was cut there; the kernel was stopped and ${STATE_GONE}.` })
      kill('output limit')
    }
    const timer = setTimeout(() => {
      result.timedOut = true
      stop()
    }, timeoutMs)
    const interrupt = () => {
      result.interrupted = true
      stop()
    }
    req.signal?.addEventListener('abort', interrupt, { once: true })
    this.running.set(req.sessionId, { interrupt })
    const workspace = join(this.opts.workspacesDir, req.sessionId)
    let measuring = false
    const quotaWatch = setInterval(async () => {
      if (measuring || killing) return
      measuring = true
      const usage = await this.overQuota(workspace)
      measuring = false
      if (!usage || killing) return
      emit({ type: 'notice', text: `${usage}; the kernel was stopped and ${STATE_GONE}. Delete files to make room.` })
      kill('workspace quota')
    }, QUOTA_CHECK_MS)
    let outcome: RunOutcome
    try {
      outcome = await kernel.run(req.code, onOutput, req.activeLines === true)
    } finally {
      clearInterval(quotaWatch)
      clearTimeout(timer)
      clearTimeout(graceTimer)
      req.signal?.removeEventListener('abort', interrupt)
      this.running.delete(req.sessionId)
    }
    if (outcome.error) result.error = outcome.error
    result.exitCode = outcome.exitCode
    if (killing) {
      await killing
      result.exitCode = null
    }
    if (!outcome.exited && !killing) {
      if (result.timedOut) emit({ type: 'notice', text: `Execution timed out after ${seconds(timeoutMs)} and was interrupted; the kernel kept its state.` })
      this.checkWorkspaceLater(req.sessionId, workspace)
      return
    }
    result.stateLost = true
    const notice = this.lostStateNotice(req.language, kernel, outcome, result, timeoutMs, outcome.exited && (await kernel.outOfMemory()))
    if (notice) emit({ type: 'notice', text: notice })
  }

  /**
   * Measures the workspace once this execution has answered; the session's next execution (any
   * language) waits for the figure and starts with the notice when the workspace ended over its
   * quota. Executions run one at a time per session, so the notice always follows the execution
   * that caused it.
   */
  private checkWorkspaceLater(sessionId: string, workspace: string): void {
    const { maxBytes, maxFiles } = this.opts.workspaceQuota
    if (maxBytes === 0 && maxFiles === 0) return
    const check = this.overQuota(workspace).then((usage) => usage && `${usage}. Delete files to make room: writing more stops the kernel.`)
    this.workspaceChecks.delete(sessionId)
    if (this.workspaceChecks.size >= MAX_PENDING_NOTICES) {
      const oldest = this.workspaceChecks.keys().next().value
      if (oldest !== undefined) this.workspaceChecks.delete(oldest)
    }
    this.workspaceChecks.set(sessionId, check)
  }

  /** A sentence saying how far the workspace is over its quota, or undefined when it is not. */
  private async overQuota(workspace: string): Promise<string | undefined> {
    const { maxBytes, maxFiles } = this.opts.workspaceQuota
    if (maxBytes === 0 && maxFiles === 0) return undefined
    const usage = await workspaceUsage(workspace, this.opts.workspaceQuota).catch((err) => {
      this.log.warn({ err, workspace }, 'workspace usage not measured')
      return undefined
    })
    if (!usage?.over) return undefined
    const mb = (bytes: number) => `${Math.round(bytes / (1024 * 1024))} MB`
    const limits = [maxBytes > 0 ? mb(maxBytes) : undefined, maxFiles > 0 ? `${maxFiles} files` : undefined].filter(Boolean).join(' or ')
    return `The workspace passed its quota of ${limits} (at least ${mb(usage.bytes)} in ${usage.files} files)`
  }

  private lostStateNotice(language: Language, kernel: Kernel, outcome: RunOutcome, result: ExecResult, timeoutMs: number, outOfMemory: boolean): string | undefined {
    const grace = seconds(this.opts.execGraceMs)
    switch (kernel.killReason) {
      case PROTOCOL_VIOLATION:
        return `The kernel was stopped: ${kernel.violation ?? 'it broke the kernel protocol'}; ${STATE_GONE}.`
      case 'output limit':
        return undefined
      case 'no stop after interrupt':
        return result.timedOut
          ? `Execution timed out after ${seconds(timeoutMs)} and did not stop within ${grace} of the interrupt, so the kernel was killed; ${STATE_GONE}.`
          : `The code did not stop within ${grace} of the interrupt, so the kernel was killed; ${STATE_GONE}.`
      case 'restart':
        return `The kernel was restarted while this code was running; ${STATE_GONE}.`
      case 'shutdown':
      case 'close':
        return `The kernel was shut down while this code was running; ${STATE_GONE}.`
    }
    const how = outOfMemory ? `out of memory: its processes together reached the ${this.opts.memoryMb} MB limit` : describeExit(outcome.exitCode, outcome.signal)
    return language === 'shell'
      ? `The shell exited (${how}). A new shell starts on the next execution: variables, functions, exported variables and the working directory are reset.`
      : `The ${NAMES[language]} kernel stopped (${how}). A new one starts on the next execution; ${STATE_GONE}.`
  }

  private onKernelExit(key: string, kernel: Kernel, language: Language, exit: KernelExit): void {
    if (this.kernels.get(key) === kernel) this.forget(key)
    this.releaseUidIfIdle(sessionOf(key))
    if (exit.requested || exit.duringRun || this.closing) return
    this.setNotice(
      key,
      `The ${NAMES[language]} kernel stopped between executions (${describeExit(exit.code, exit.signal)}) and was restarted; ${STATE_GONE}.`,
    )
  }

  private setNotice(key: string, text: string): void {
    this.notices.delete(key)
    if (this.notices.size >= MAX_PENDING_NOTICES) {
      const oldest = this.notices.keys().next().value
      if (oldest !== undefined) this.notices.delete(oldest)
    }
    this.notices.set(key, text)
  }

  private async stopSession(sessionId: string, language: Language | undefined, reason: string): Promise<void> {
    const stops: Promise<void>[] = []
    for (const lang of language ? [language] : LANGUAGES) {
      const key = keyOf(sessionId, lang)
      this.notices.delete(key)
      const kernel = this.kernels.get(key)
      if (kernel) stops.push(this.retire(key, kernel, reason))
    }
    await Promise.all(stops)
  }

  private forget(key: string): void {
    this.kernels.delete(key)
    this.tenants.delete(key)
  }

  /** A uid goes back to the pool once none of the session's kernels is alive. */
  private releaseUidIfIdle(sessionId: string): void {
    if (!LANGUAGES.some((language) => this.kernels.has(keyOf(sessionId, language)))) this.uids.release(sessionId)
  }

  /** Takes a kernel out of service and kills it; close() waits for every such kill. */
  private retire(key: string, kernel: Kernel, reason: string): Promise<void> {
    if (this.kernels.get(key) === kernel) this.forget(key)
    const killed = kernel.kill(reason).catch((err) => this.log.error({ err, kernel: key }, 'failed to kill kernel'))
    this.dying.add(killed)
    void killed.finally(() => this.dying.delete(killed))
    return killed
  }

  /**
   * Makes room for one more kernel of `tenantId`. A tenant at its quota gives up its own least
   * recently used idle kernel; when the server is full, the tenant with the most kernels does, so
   * a tenant can never push out the kernels of one that holds fewer than it.
   */
  private evictForRoom(tenantId: string): void {
    const counts = new Map<string, number>()
    for (const tenant of this.tenants.values()) counts.set(tenant, (counts.get(tenant) ?? 0) + 1)
    const own = counts.get(tenantId) ?? 0
    if (own >= this.opts.maxKernelsPerTenant) {
      if (this.evictOne(tenantId, `this API key runs at most ${this.opts.maxKernelsPerTenant} kernels at once`)) return
      throw new ApiError(429, 'rate_limit_error', 'kernel_quota_exceeded', `All ${this.opts.maxKernelsPerTenant} kernels of this API key are busy; try again when one has finished`)
    }
    if (this.tenants.size < this.opts.maxKernels) return
    let victim = tenantId
    for (const [tenant, count] of counts) if (count > (counts.get(victim) ?? 0) && count > own) victim = tenant
    // Every kernel busy: the server runs one more than MAX_KERNELS rather than refuse.
    this.evictOne(victim, `at most ${this.opts.maxKernels} kernels run at once on this server`)
  }

  /** Evicts the tenant's least recently used idle kernel; false when all of them are busy. */
  private evictOne(tenantId: string, why: string): boolean {
    for (const [key, kernel] of this.kernels) {
      if (kernel.busy || this.tenants.get(key) !== tenantId) continue
      this.setNotice(key, `The ${NAMES[languageOf(key)]} kernel of this session was stopped to make room for another (${why}); ${STATE_GONE}.`)
      void this.retire(key, kernel, 'evicted')
      return true
    }
    return false
  }

  private reapIdle(): void {
    const cutoff = Date.now() - this.opts.idleSeconds * 1000
    for (const [key, kernel] of this.kernels) {
      if (kernel.busy || kernel.lastUsed > cutoff) continue
      this.setNotice(key, `The ${NAMES[languageOf(key)]} kernel was stopped after ${this.opts.idleSeconds} s without use; ${STATE_GONE}.`)
      void this.retire(key, kernel, 'idle')
    }
  }
}
