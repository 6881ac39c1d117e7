import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import pino, { type DestinationStream, type Logger, type StreamEntry } from 'pino'
import pretty from 'pino-pretty'

/** Paths whose values never reach a log line. */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["x-api-key"]',
  'headers.authorization',
  '*.authorization',
  '*.apiKey',
  '*.api_key',
  '*.token',
  '*.secret',
  '*.password',
  '*.LLM_API_KEY',
  '*.SECRETS_KEY',
]

/**
 * For people: one line per event, a request as `GET /v1/sessions 200 3.1ms`, other fields inline.
 * The JSON lines keep every field.
 */
export const PRETTY = {
  colorize: true,
  sync: true,
  singleLine: true,
  ignore: 'pid,hostname,req,res,responseTime',
  messageFormat: (log: Record<string, unknown>, messageKey: string) => {
    const req = log.req as { method?: string; url?: string } | undefined
    const res = log.res as { statusCode?: number } | undefined
    const message = String(log[messageKey] ?? '')
    if (!req?.method) return message
    const time = typeof log.responseTime === 'number' ? ` ${log.responseTime.toFixed(1)}ms` : ''
    const outcome = message === 'request completed' ? '' : ` ${message}`
    return `${req.method} ${req.url} ${res?.statusCode ?? ''}${time}${outcome}`
  },
}

export interface LoggerOptions {
  level: string
  /** Also write server_out.log (everything) and server_err.log (warnings and errors) there. */
  logDir?: string
  /** Human-readable output; server.ts turns it on only when stdout is a TTY. */
  pretty: boolean
}

/**
 * pino JSON to stdout, pretty on a TTY, with the seed's optional log files. `mask` (secrets
 * masking, set later by the secrets service) rewrites each line's text before it is written.
 */
export function createLogger(opts: LoggerOptions, mask: (line: string) => string = (l) => l): Logger {
  const masked = (dest: DestinationStream): DestinationStream => ({ write: (line: string) => dest.write(mask(line)) })
  const streams: StreamEntry[] = [
    { level: 'trace', stream: masked(opts.pretty ? pretty(PRETTY) : pino.destination({ dest: 1, sync: false })) },
  ]
  if (opts.logDir) {
    mkdirSync(opts.logDir, { recursive: true })
    streams.push({ level: 'trace', stream: masked(pino.destination({ dest: join(opts.logDir, 'server_out.log'), sync: false })) })
    streams.push({ level: 'warn', stream: masked(pino.destination({ dest: join(opts.logDir, 'server_err.log'), sync: false })) })
  }
  return pino({ level: opts.level, redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, pino.multistream(streams))
}
