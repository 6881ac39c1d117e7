#!/usr/bin/env node
import { parseArgs } from 'node:util'
import { start } from './server.js'
import { VERSION } from './services/version.js'

const HELP = `Usage: oi-server [--host HOST] [--port PORT]

Runs the oi-server HTTP API. Every setting comes from the environment (or a .env file in the
working directory); see .env.example. --host and --port override HOST and PORT.

Options:
  --host HOST     interface to listen on (default 127.0.0.1)
  --port PORT     port to listen on (default 5001)
  -h, --help      show this help
  -v, --version   print the version
`

let args: ReturnType<typeof parse>
function parse() {
  return parseArgs({
    options: {
      host: { type: 'string' },
      port: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
      version: { type: 'boolean', short: 'v' },
    },
  }).values
}
try {
  args = parse()
} catch (err) {
  process.stderr.write(`${(err as Error).message}\n\n${HELP}`)
  process.exit(1)
}

if (args.help) {
  process.stdout.write(HELP)
} else if (args.version) {
  process.stdout.write(`${VERSION}\n`)
} else {
  const port = args.port === undefined ? undefined : Number(args.port)
  if (port !== undefined && !(Number.isInteger(port) && port >= 0 && port <= 65535)) {
    process.stderr.write(`Invalid --port: ${args.port} (an integer from 0 to 65535)\n`)
    process.exit(1)
  }
  await start({ host: args.host, port })
}
