import { mkdirSync, openSync } from 'node:fs'
import { join } from 'node:path'
import pino, { type DestinationStream, type Logger, type StreamEntry } from 'pino'
import pretty from 'pino-pretty'

/** Field names whose values never reach a log line. */
const SECRET_FIELDS = ['authorization', 'apiKey', 'api_key', 'token', 'secret', 'password', 'LLM_API_KEY', 'SECRETS_KEY']

/**
 * Paths whose values never reach a log line, all explicit: pino's redaction costs per path, and
 * a wildcard path (`*.token`) makes it walk every object of every line, the request line
 * included, which was a large share of a cheap request. Fastify's `req` serializer writes no
 * headers (test/services/logger.test.ts holds it to that); the header paths catch a `req` logged
 * by hand. Otherwise an error (`err`, whose serializer copies a library's own fields) or fields
 * named at the call can carry a credential.
 */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["x-api-key"]',
  'headers.authorization',
  'err.headers.authorization',
  ...SECRET_FIELDS,
  ...SECRET_FIELDS.map((field) => `err.${field}`),
]

/** Bytes a file or stdout destination gathers before it writes (one write per ~15 request lines). */
const BUFFER_BYTES = 4096
/** The longest a buffered line waits for the write, when traffic is too light to fill the buffer. */
const FLUSH_EVERY_MS = 1000

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
 *
 * stdout and the files are asynchronous and buffered (sonic-boom with `minLength`): lines are
 * written BUFFER_BYTES at a time, or after FLUSH_EVERY_MS at the latest, so a request costs no
 * write of its own. Nothing is lost on the way out: `flushLogs` writes what is buffered (server.ts
 * calls it after closing the app), and pino flushes every such destination synchronously when the
 * process exits. Only a SIGKILL or a crash of the host loses the last second of lines.
 */
export function createLogger(opts: LoggerOptions, mask: (line: string) => string = (l) => l): Logger {
  const masked = (dest: DestinationStream): DestinationStream => ({ write: (line: string) => dest.write(mask(line)) })
  const destinations: Destination[] = []
  const buffered = (dest: number | string) => {
    // A file is opened here, synchronously: opened by sonic-boom it would not be ready for a few
    // ticks, and a process exiting in that time (a failed start) would lose its lines.
    const fd = typeof dest === 'number' ? dest : openSync(dest, 'a')
    const destination = pino.destination({ dest: fd, sync: false, minLength: BUFFER_BYTES, periodicFlush: FLUSH_EVERY_MS })
    destinations.push(destination)
    return destination
  }
  const streams: StreamEntry[] = [{ level: 'trace', stream: masked(opts.pretty ? pretty(PRETTY) : buffered(1)) }]
  if (opts.logDir) {
    mkdirSync(opts.logDir, { recursive: true })
    streams.push({ level: 'trace', stream: masked(buffered(join(opts.logDir, 'server_out.log'))) })
    streams.push({ level: 'warn', stream: masked(buffered(join(opts.logDir, 'server_err.log'))) })
  }
  const logger = pino({ level: opts.level, redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, pino.multistream(streams))
  buffers.set(logger, destinations)
  return logger
}

type Destination = ReturnType<typeof pino.destination>

const buffers = new WeakMap<Logger, Destination[]>()

/**
 * Resolves once every line a logger from `createLogger` had buffered is written (a write in
 * flight is waited for, so lines keep their order). Other loggers have nothing to flush.
 */
export async function flushLogs(logger: Logger): Promise<void> {
  await Promise.all(
    (buffers.get(logger) ?? []).map(
      (destination) =>
        new Promise<void>((resolve) =>
          // flush() waits for a write in flight but can leave what arrived meanwhile in the buffer
          // (less than minLength): that rest is written synchronously once nothing is in flight.
          destination.flush((err) => {
            // a destination that failed (its file went away) has nothing left to write
            if (!err) destination.flushSync()
            resolve()
          }),
        ),
    ),
  )
}
