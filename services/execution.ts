import { randomUUID } from 'node:crypto'
import type { EventBus } from './events.js'
import type { BackgroundOutput, ExecResult, ExecuteRequest, KernelOutput, Language } from './kernels/types.js'
import type { Metrics } from './metrics.js'
import type { SecretsService } from './secrets.js'

export interface KernelRunner {
  execute(req: ExecuteRequest): Promise<ExecResult>
}

export interface ExecutionRequest {
  tenantId: string
  sessionId: string
  language: Language
  code: string
  timeoutMs?: number
  signal?: AbortSignal
  /** See ExecuteRequest.activeLines. */
  activeLines?: boolean
  onOutput?: (output: KernelOutput) => void
}

function masked(output: KernelOutput, redact: (text: string) => string): KernelOutput {
  return output.type === 'image' || output.type === 'active_line' ? output : { ...output, text: redact(output.text) }
}

/**
 * Every execution, from the agent or from POST /execute, goes through here: the tenant's
 * secrets become the kernel's environment, their values are masked in everything that comes
 * back, and the session's event log records the start and the end.
 */
export class ExecutionService {
  constructor(
    private readonly kernels: KernelRunner,
    private readonly bus: EventBus,
    private readonly secrets: SecretsService,
    private readonly metrics: Metrics,
  ) {}

  async run(req: ExecutionRequest): Promise<ExecResult> {
    const { env, redact, stream } = await this.secrets.forTenant(req.tenantId)
    // Each read is masked with what is held from the one before: a value printed in pieces
    // (unbuffered output, a slow pipe) is never shown half before its end arrives.
    const streams = { stdout: stream(), stderr: stream() }
    const flush = () => {
      for (const name of ['stdout', 'stderr'] as const) {
        const text = streams[name].flush()
        if (text) req.onOutput?.({ type: 'stream', stream: name, text })
      }
    }
    const onOutput = (output: KernelOutput) => {
      // Not a flush point: held output may be the first half of a secret printed over two lines.
      if (output.type === 'active_line') return req.onOutput?.(output)
      if (output.type !== 'stream') {
        flush()
        return req.onOutput?.(masked(output, redact))
      }
      const text = streams[output.stream].push(output.text)
      if (text) req.onOutput?.({ ...output, text })
    }
    const executionId = randomUUID()
    await this.bus.append(req.sessionId, 'execution_started', { execution_id: executionId, language: req.language, code: redact(req.code) })
    let result: ExecResult
    try {
      result = await this.kernels.execute({
        sessionId: req.sessionId,
        tenantId: req.tenantId,
        language: req.language,
        code: req.code,
        timeoutMs: req.timeoutMs,
        env,
        signal: req.signal,
        activeLines: req.activeLines,
        onOutput,
      })
      flush()
    } catch (err) {
      flush()
      this.metrics.executions.inc({ language: req.language, outcome: 'failed' })
      await this.bus.append(req.sessionId, 'execution_finished', { execution_id: executionId, failed: redact((err as Error).message) })
      throw err
    }
    if (result.error) result = { ...result, error: { name: result.error.name, value: redact(result.error.value), traceback: redact(result.error.traceback) } }
    const outcome = result.timedOut ? 'timeout' : result.interrupted ? 'interrupted' : result.error || result.exitCode ? 'error' : 'ok'
    this.metrics.executions.inc({ language: req.language, outcome })
    this.metrics.executionDuration.observe({ language: req.language }, result.durationMs / 1000)
    await this.bus.append(req.sessionId, 'execution_finished', {
      execution_id: executionId,
      exit_code: result.exitCode,
      duration_ms: result.durationMs,
      timed_out: result.timedOut,
      state_lost: result.stateLost,
      truncated: result.truncated,
      ...(result.error ? { error: { name: result.error.name, value: result.error.value } } : {}),
    })
    return result
  }

  /**
   * Records in the session's event log, as a `kernel_output` event (`{language, output}`, the
   * output masked like an execution's), what a kernel wrote while none of its executions ran:
   * background jobs, and late errors of JavaScript cells that had ended.
   */
  async recordBackground(background: BackgroundOutput): Promise<void> {
    const { redact } = await this.secrets.forTenant(background.tenantId)
    await this.bus.append(background.sessionId, 'kernel_output', { language: background.language, output: masked(background.output, redact) })
  }
}
