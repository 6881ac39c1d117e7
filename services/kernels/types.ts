import type { WorkspaceLimits } from '../workspaces.js'

/** Languages a kernel can run. Aliases (py, bash, zsh, js, nodejs…) are resolved by `resolveLanguage`. */
export type Language = 'python' | 'shell' | 'javascript'

export interface LanguageInfo {
  name: Language
  aliases: string[]
  version: string | null
  available: boolean
}

/** One piece of output, delivered as the kernel produces it. */
export type KernelOutput =
  | { type: 'stream'; stream: 'stdout' | 'stderr'; text: string }
  | { type: 'image'; format: 'base64.png' | 'base64.jpeg'; data: string }
  /** The value of a trailing expression, as Jupyter shows it. */
  | { type: 'result'; text: string }
  /** Something the server says about the kernel itself (restarted, state lost, output cut). */
  | { type: 'notice'; text: string }
  /**
   * The 1-based line of the cell now running (Open Interpreter's `active_line`); only for an
   * execution that asked for it (`ExecuteRequest.activeLines`), sent as the line changes.
   */
  | { type: 'active_line'; line: number }

/** Output a kernel wrote while none of its executions was running (see KernelManager.onBackgroundOutput). */
export interface BackgroundOutput {
  sessionId: string
  tenantId: string
  language: Language
  output: KernelOutput
}

export interface ExecError {
  name: string
  value: string
  traceback: string
}

export interface ExecResult {
  exitCode: number | null
  error?: ExecError
  durationMs: number
  timedOut: boolean
  /** The kernel had to be killed (timeout past the grace period, output cap, crash): variables are gone. */
  stateLost: boolean
  /** Output went past EXEC_OUTPUT_LIMIT_BYTES and was cut. */
  truncated: boolean
  interrupted: boolean
}

export interface ExecuteRequest {
  sessionId: string
  /** The API key (tenant) the session belongs to: kernels are counted against its quota. */
  tenantId: string
  language: Language
  code: string
  /** Capped at the server's EXEC_TIMEOUT_MS. */
  timeoutMs?: number
  /** Extra environment for the kernel (the tenant's secrets); applied when the kernel starts. */
  env?: Record<string, string>
  signal?: AbortSignal
  /**
   * Report the running line as `active_line` outputs (Python and shell; JavaScript reports
   * none). Off by default: the code then runs as written, uninstrumented.
   */
  activeLines?: boolean
  onOutput?: (output: KernelOutput) => void
}

export interface KernelManagerOptions {
  /** Disk quota of each workspace, watched while code runs (0 = no limit). */
  workspaceQuota: WorkspaceLimits
  /** Root under which each session's workspace lives: `${workspacesDir}/${sessionId}`. */
  workspacesDir: string
  sandbox: 'bwrap' | 'none'
  sandboxNetwork: boolean
  pythonBin: string
  nodeBin: string
  bashBin: string
  idleSeconds: number
  maxKernels: number
  /** Live kernels per tenant; a tenant at its quota evicts its own least recently used kernel. */
  maxKernelsPerTenant: number
  execTimeoutMs: number
  execGraceMs: number
  outputLimitBytes: number
  memoryMb: number
  maxProcesses: number
  maxFileMb: number
  maxOpenFiles: number
  /** Size of the sandbox's /tmp and /dev/shm tmpfs mounts, each, in MiB. */
  tmpfsMb: number
}
