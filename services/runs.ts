import { sessionBusy } from './errors.js'

/**
 * One agent turn in progress: how to cancel it. A turn that waits for its client (a
 * confirmation, tool results) is not running: it is suspended in the store (services/chat.ts).
 */
export class Run {
  readonly controller = new AbortController()

  constructor(readonly sessionId: string) {}

  get signal(): AbortSignal {
    return this.controller.signal
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
