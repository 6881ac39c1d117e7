import { randomUUID } from 'node:crypto'
import type { LmcChunk, LmcInput, LmcMessage } from '../schemas/lmc.js'
import type { RunConfig, Settings } from '../schemas/settings.js'
import { type ClientTools, runTurn, type PassThrough, type Suspension, type TokenUsage, type TurnResult } from './agent/loop.js'
import { ApiError, invalidRequest, sessionBusy, sessionNotFound } from './errors.js'
import type { EventBus } from './events.js'
import type { ExecutionService } from './execution.js'
import type { Language } from './kernels/types.js'
import type { Metrics } from './metrics.js'
import type { Run, RunRegistry } from './runs.js'
import type { SecretsService } from './secrets.js'
import type { SettingsService } from './settings.js'
import type { SessionRecord, Store, SuspendedTurnRecord } from './store/types.js'
import type OpenAI from 'openai'

export interface ChatRequest {
  tenantId: string
  sessionId: string
  inputs: LmcInput[]
  config?: RunConfig
  /** The effective settings for `config`, when the caller already resolved them; read otherwise. */
  settings?: Settings
  /** Sent with every upstream call of the turn (the OpenAI route's stop, seed, top_p…). */
  passThrough?: PassThrough
  /** Replaces the system message for this run (the OpenAI route's system/developer messages). */
  systemMessage?: string
  /** The client's function tools; a call to one suspends the turn until its results come back. */
  tools?: ClientTools
  /**
   * The conversation this turn continues, instead of the session's whole log (the Responses
   * API's `previous_response_id` chain, which may branch within one session).
   */
  history?: LmcMessage[]
  /** Offer the server's code tool; false runs a plain model turn in the session. Default true. */
  codeTool?: boolean
  emit?: (chunk: LmcChunk) => void
  /**
   * Code run by this turn reports its running line, emitted as `active_line` chunks (the Open
   * Interpreter protocol). Off by default: no other API shows them, and the code runs uninstrumented.
   */
  activeLines?: boolean
  /**
   * Called once the upstream first answered and the user's messages are stored: from here on
   * the turn has side effects, and a streaming route can commit to its 200.
   */
  onStart?: () => void
  /**
   * Store nothing until the upstream first answers, so a turn the upstream refuses can be
   * retried as it is (the OpenAI route, whose SDKs retry). Otherwise the user's messages and
   * `run_started` are stored before the first upstream call, as observers of the log expect.
   */
  storeOnAnswer?: boolean
  /** The caller made the session for this turn: a turn that fails before it started deletes it. */
  newSession?: boolean
  /** Aborted when the client goes away. */
  signal?: AbortSignal
}

/**
 * What a suspended turn waits for, as the API shows it (`pending` in /v1/chat answers and their
 * `done` event). `confirmation`: the code `message_id` asks to run (`auto_run: false`), resumed by
 * POST /v1/sessions/{id}/confirm, a WebSocket `confirm` frame, or a chat request whose only message
 * is `{role: "user", type: "confirmation", content: {approve}}`. `tool_calls`: the client's tool
 * calls (OpenAI's `tool_calls[]` shape), resumed by a chat request carrying a result for each id.
 */
export type Pending =
  | { type: 'confirmation'; message_id: string; language: Language; code: string }
  | { type: 'tool_calls'; tool_calls: { id: string; type: 'function'; function: { name: string; arguments: string } }[] }

export interface ChatResult extends TurnResult {
  model: string
  /** The request's messages as stored at the start of the turn (before `messages`). */
  inputs: LmcMessage[]
  /** Set when the turn is suspended, waiting for its client. */
  pending?: Pending
}

/** The request fields a suspended turn keeps, so a resume without them (a confirmation) runs as the turn began. */
interface KeptParams {
  config?: RunConfig
  passThrough?: PassThrough
  systemMessage?: string
  tools?: ClientTools
}

/** A suspended turn's `state` in the store. */
interface SuspendedState {
  suspension: Suspension
  params: KeptParams
}

/** What a chat request does with the session's suspended turn, decided before anything runs. */
interface Plan {
  /** Continue the suspended turn (with the user's decision for a confirmation). */
  resume?: { suspension: Suspension; approve?: boolean }
  /** The suspended turn this request takes over: resumed, or ended unanswered by new messages. */
  claim?: SuspendedTurnRecord
  params: KeptParams
  /** The messages to store. */
  inputs: LmcInput[]
}

export function pendingOf(suspension: Suspension): Pending {
  const { confirmation } = suspension
  if (confirmation) return { type: 'confirmation', message_id: confirmation.messageId, language: confirmation.language, code: confirmation.code }
  return {
    type: 'tool_calls',
    tool_calls: suspension.toolCalls.map((call) => ({ id: call.id, type: 'function', function: { name: call.name, arguments: call.arguments } })),
  }
}

export const nothingToConfirm = () =>
  new ApiError(409, 'conflict_error', 'nothing_to_confirm', 'No turn in this session is waiting for a confirmation')

const objectContent = (input: LmcInput): Record<string, unknown> | undefined =>
  typeof input.content === 'object' && input.content !== null && !Array.isArray(input.content) ? input.content : undefined

/** `{role: "user", type: "confirmation", content: {approve}}`: the user's decision on pending code. */
function decisionOf(inputs: LmcInput[]): boolean | undefined {
  const [only] = inputs
  if (inputs.length !== 1 || only?.type !== 'confirmation' || only.role !== 'user') return undefined
  const approve = objectContent(only)?.approve
  if (typeof approve !== 'boolean') throw invalidRequest('A confirmation needs content {"approve": true|false}', 'messages[0].content', 'invalid_message')
  return approve
}

/** Checks the tool-call messages a client sends (hand-made LMC or converted from Chat Completions) and returns the results' ids. */
function toolMessages(inputs: LmcInput[]): { calls: Set<string>; results: { id: string; at: string }[] } {
  const calls = new Set<string>()
  const results: { id: string; at: string }[] = []
  inputs.forEach((input, i) => {
    const content = objectContent(input)
    if (input.type === 'tool_call') {
      if (input.role !== 'assistant' || typeof content?.id !== 'string' || typeof content.name !== 'string' || typeof content.arguments !== 'string') {
        throw invalidRequest('A tool_call message is {role: "assistant", content: {id, name, arguments}} with strings', `messages[${i}]`, 'invalid_message')
      }
      calls.add(content.id)
    } else if (input.type === 'tool_result') {
      if (typeof content?.tool_call_id !== 'string' || typeof content.content !== 'string') {
        throw invalidRequest('A tool_result message is {role: "computer", content: {tool_call_id, content}} with strings', `messages[${i}]`, 'invalid_message')
      }
      results.push({ id: content.tool_call_id, at: `messages[${i}]` })
    } else if (input.type === 'confirmation' && input.role === 'user') {
      throw invalidRequest('A confirmation must be the only message of its request', `messages[${i}]`, 'invalid_message')
    }
  })
  return { calls, results }
}

export interface ChatDeps {
  store: Store
  bus: EventBus
  runs: RunRegistry
  settings: SettingsService
  secrets: SecretsService
  execution: ExecutionService
  metrics: Metrics
  client: () => OpenAI
  languages: () => Promise<Language[]>
  tools: boolean
  maxOutputChars: number
}

const envelopeOf = (err: unknown) =>
  err instanceof ApiError
    ? { message: err.message, type: err.type, code: err.code, param: err.param }
    : { message: 'Internal server error', type: 'server_error', code: 'internal_error', param: null }

/**
 * One agent turn in a session: stores the new user messages, runs the loop with the session's
 * kernel as executor, stores each message as it completes and records run events. One run per
 * session at a time (409 otherwise); `runs.stop(sessionId)` cancels it.
 */
export class ChatService {
  constructor(private readonly deps: ChatDeps) {}

  /**
   * The checks that can refuse a chat before anything exists for it: 503 without an upstream,
   * 409 when the session already runs. Callers run it before they create a session.
   */
  check(sessionId?: string): void {
    this.deps.client()
    if (sessionId && this.deps.runs.get(sessionId)) throw sessionBusy()
  }

  /** The session a chat runs in: the named one (404 if it is not the tenant's), or a new one once the checks passed. */
  async session(tenantId: string, named: string | undefined, create: () => Promise<SessionRecord>): Promise<SessionRecord> {
    if (named) {
      const session = await this.deps.store.getSession(tenantId, named)
      if (!session) throw sessionNotFound()
      this.check(session.id)
      return session
    }
    this.check()
    return create()
  }

  /**
   * Throws synchronously when the run cannot start (no upstream configured: 503; the session
   * already runs: 409), so a caller can still answer with a plain error before it opens a stream.
   *
   * With `storeOnAnswer` nothing is stored until the upstream first answers: a turn the upstream
   * refuses (429, 400, 5xx before any output) leaves the session as it was and can be retried as
   * it is. Any failure after something was stored is marked not retryable (`x-should-retry:
   * false`): the user's messages are stored and code may have run, so a blind retry would repeat them.
   */
  run(req: ChatRequest): Promise<ChatResult> {
    const client = this.deps.client()
    const run = this.deps.runs.begin(req.sessionId)
    return this.turn(req, client, run)
  }

  /**
   * Resumes the session's turn suspended on a code confirmation: approved, the code runs and the
   * turn goes on; declined, the model is told. 409 `nothing_to_confirm` when no turn waits for one.
   */
  confirm(req: Omit<ChatRequest, 'inputs'> & { approve: boolean }): Promise<ChatResult> {
    const { approve, ...rest } = req
    return this.run({ ...rest, inputs: [{ role: 'user', type: 'confirmation', content: { approve } }] })
  }

  /**
   * Ends the session's suspended turn without an answer (POST /stop when nothing runs): pending
   * code counts as declined, pending tool calls as unanswered. False when none was suspended.
   */
  async cancelSuspended(sessionId: string): Promise<boolean> {
    if (this.deps.runs.get(sessionId)) return false
    const suspended = await this.deps.store.getSuspendedTurn(sessionId)
    if (!suspended || !(await this.deps.store.claimSuspendedTurn(sessionId, suspended.id))) return false
    await this.deps.bus.append(sessionId, 'run_finished', { usage: { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 }, stopped: true })
    return true
  }

  /**
   * Decides what the request does with a suspended turn. Tool results must answer exactly the
   * calls the turn waits for (400 otherwise, as OpenAI refuses a history with an unanswered call);
   * a confirmation needs a turn waiting for one (409); new messages end the waiting turn
   * unanswered and start a new one, as a user who moves on instead of answering.
   */
  private plan(req: ChatRequest, suspended: SuspendedTurnRecord | undefined): Plan {
    const state = suspended?.state as SuspendedState | undefined
    const kept = state?.params ?? {}
    const params: KeptParams = {
      config: req.config ?? kept.config,
      passThrough: req.passThrough ?? kept.passThrough,
      systemMessage: req.systemMessage ?? kept.systemMessage,
      tools: req.tools ?? kept.tools,
    }
    const approve = decisionOf(req.inputs)
    if (approve !== undefined) {
      if (!suspended || !state?.suspension.confirmation) throw nothingToConfirm()
      return { resume: { suspension: state.suspension, approve }, claim: suspended, params, inputs: [] }
    }
    const { calls, results } = toolMessages(req.inputs)
    const waiting = state && !state.suspension.confirmation ? state.suspension.toolCalls : []
    const awaited = new Set(waiting.map((call) => call.id))
    for (const result of results) {
      if (!calls.has(result.id) && !awaited.has(result.id)) {
        throw invalidRequest(`No tool call with id "${result.id}" is waiting for a result in this session`, `${result.at}.tool_call_id`, 'unknown_tool_call')
      }
    }
    const answered = new Set(results.map((r) => r.id))
    const answers = waiting.filter((call) => answered.has(call.id))
    if (answers.length > 0) {
      const missing = waiting.filter((call) => !answered.has(call.id)).map((call) => call.id)
      if (missing.length > 0) {
        throw invalidRequest(`Every tool call needs its result; missing: ${missing.join(', ')}`, 'messages', 'tool_results_missing')
      }
      return { resume: { suspension: state!.suspension }, claim: suspended, params, inputs: req.inputs }
    }
    return { ...(suspended ? { claim: suspended } : {}), params, inputs: req.inputs }
  }

  private async turn(req: ChatRequest, client: OpenAI, run: Run): Promise<ChatResult> {
    const { store, bus, runs, metrics } = this.deps
    const cancel = () => run.controller.abort()
    if (req.signal?.aborted) cancel()
    req.signal?.addEventListener('abort', cancel, { once: true })
    let started: Promise<void> | undefined
    try {
      // a session made for this turn has nothing suspended and no history to read
      const plan = this.plan(req, req.newSession ? undefined : await store.getSuspendedTurn(req.sessionId))
      const { params, resume } = plan
      const [settings, secrets, languages, stored] = await Promise.all([
        req.settings && req.config === params.config ? req.settings : this.deps.settings.effective(req.tenantId, params.config),
        this.deps.secrets.forTenant(req.tenantId),
        req.codeTool === false ? [] : this.deps.languages(),
        req.history ?? (req.newSession ? [] : store.allMessages(req.sessionId)),
      ])
      const inputs = plan.inputs.map(
        (input) =>
          ({
            id: randomUUID(),
            role: input.role,
            type: input.type ?? 'message',
            ...(input.format ? { format: input.format } : {}),
            ...(input.recipient ? { recipient: input.recipient } : {}),
            content: typeof input.content === 'string' ? secrets.redact(input.content) : input.content,
            created_at: new Date().toISOString(),
          }) as LmcMessage,
      )
      const start = () => {
        started ??= (async () => {
          if (plan.claim) {
            if (!(await store.claimSuspendedTurn(req.sessionId, plan.claim.id))) {
              throw new ApiError(409, 'conflict_error', 'session_busy', 'The suspended turn of this session was taken over by another request')
            }
          }
          // one commit for the phase: the end of an abandoned turn, the user's messages and run_started
          await bus.appendAll(req.sessionId, [
            // A turn left waiting for an answer that never came is over.
            ...(plan.claim && !resume ? [{ type: 'run_finished', data: { usage: { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 }, stopped: true } }] : []),
            ...inputs.map((message) => ({ message })),
            { type: 'run_started', data: { model: settings.model, ...(resume ? { resumed: true } : {}) } },
          ])
          req.onStart?.()
        })()
        return started
      }
      // Approved code runs before any upstream call: that is a side effect, so the turn starts now.
      if (!req.storeOnAnswer || resume?.suspension.confirmation) await start()
      const result = await runTurn({
        client,
        model: settings.model,
        temperature: settings.temperature,
        maxTokens: settings.max_tokens,
        ...(params.passThrough ? { passThrough: params.passThrough } : {}),
        ...(params.tools ? { clientTools: params.tools } : {}),
        ...(resume ? { resume } : {}),
        maxIterations: settings.max_iterations,
        systemMessage: params.systemMessage ?? (settings.system_message || undefined),
        customInstructions: settings.custom_instructions || undefined,
        history: [...stored, ...inputs],
        languages,
        tools: this.deps.tools,
        autoRun: settings.auto_run,
        answered: start,
        execute: (language, code, onOutput, signal) =>
          this.deps.execution.run({ tenantId: req.tenantId, sessionId: req.sessionId, language, code, onOutput, signal, activeLines: req.activeLines }),
        persist: async (message) => {
          await bus.appendMessage(req.sessionId, message)
        },
        emit: req.emit ?? (() => {}),
        redact: secrets.redact,
        signal: run.signal,
        maxOutputChars: this.deps.maxOutputChars,
      })
      // A turn stopped before the upstream answered still keeps what the user said.
      await start()
      this.count(result.usage)
      if (result.suspended) {
        const pending = pendingOf(result.suspended)
        const state: SuspendedState = { suspension: result.suspended, params }
        await store.putSuspendedTurn({ id: randomUUID(), sessionId: req.sessionId, reason: pending.type, state })
        metrics.runs.inc({ outcome: 'suspended' })
        if (pending.type === 'confirmation') await bus.append(req.sessionId, 'awaiting_confirmation', { message_id: pending.message_id })
        await bus.append(req.sessionId, 'run_suspended', { usage: result.usage, pending })
        return { ...result, model: settings.model, inputs, pending }
      }
      metrics.runs.inc({ outcome: result.stopped ? 'stopped' : 'finished' })
      await bus.append(req.sessionId, 'run_finished', { usage: result.usage, stopped: result.stopped })
      return { ...result, model: settings.model, inputs }
    } catch (err) {
      metrics.runs.inc({ outcome: 'failed' })
      if (!started) {
        if (req.newSession) await store.deleteSession(req.tenantId, req.sessionId).catch(() => {})
        throw err
      }
      await started.catch(() => {})
      await bus.append(req.sessionId, 'run_failed', { error: envelopeOf(err) }).catch(() => {})
      throw err instanceof ApiError ? err.final() : new ApiError(500, 'server_error', 'internal_error', 'Internal server error', null, {}, { cause: err }).final()
    } finally {
      req.signal?.removeEventListener('abort', cancel)
      runs.end(run)
    }
  }

  private count(usage: TokenUsage) {
    this.deps.metrics.upstreamTokens.inc({ kind: 'prompt' }, usage.prompt_tokens)
    this.deps.metrics.upstreamTokens.inc({ kind: 'completion' }, usage.completion_tokens)
  }
}
