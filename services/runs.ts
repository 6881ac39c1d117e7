import type { LmcMessage } from '../schemas/lmc.js'
import { sessionBusy } from './errors.js'

/** One agent turn in progress: how to cancel it, and the confirmation it may be waiting for. */
export class Run {
  readonly controller = new AbortController()
  private confirmation: { code: LmcMessage; resolve: (approve: boolean) => void } | undefined

  constructor(readonly sessionId: string) {}

  get signal(): AbortSignal {
    return this.controller.signal
  }

  /** Waits for POST /confirm (or a socket `confirm` frame); a stopped run counts as declined. */
  awaitConfirmation(code: LmcMessage): Promise<boolean> {
    return new Promise((resolve) => {
      const done = (approve: boolean) => {
        this.confirmation = undefined
        this.signal.removeEventListener('abort', onAbort)
        resolve(approve)
      }
      const onAbort = () => done(false)
      this.confirmation = { code, resolve: done }
      if (this.signal.aborted) onAbort()
      else this.signal.addEventListener('abort', onAbort, { once: true })
    })
  }

  get awaiting(): LmcMessage | undefined {
    return this.confirmation?.code
  }

  confirm(approve: boolean): boolean {
    if (!this.confirmation) return false
    this.confirmation.resolve(approve)
    return true
  }
}

/** At most one run per session in this process. */
export class RunRegistry {
  private readonly runs = new Map<string, Run>()

  /** Throws 409 session_busy when the session already runs. */
  begin(sessionId: string): Run {
    if (this.runs.has(sessionId)) throw sessionBusy()
    const run = new Run(sessionId)
    this.runs.set(sessionId, run)
    return run
  }

  end(run: Run): void {
    if (this.runs.get(run.sessionId) === run) this.runs.delete(run.sessionId)
  }

  get(sessionId: string): Run | undefined {
    return this.runs.get(sessionId)
  }

  /** Cancels the session's run; false when none is running. */
  stop(sessionId: string): boolean {
    const run = this.runs.get(sessionId)
    run?.controller.abort()
    return run !== undefined
  }

  stopAll(): void {
    for (const run of this.runs.values()) run.controller.abort()
  }

  get size(): number {
    return this.runs.size
  }
}
