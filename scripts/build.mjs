// `npm run build`: compiles with tsconfig.build.json, copies the files that run as they are (the
// kernel drivers and the seccomp filter generator) and records a fingerprint of the sources in
// dist/.sources. `--if-stale` (npm's prestart) builds only when that fingerprint differs from the
// sources' now, so a second `npm start` does not recompile; `--check` only says so (exit 0: dist/
// is current, 1: it is not).
//
// The fingerprint covers every file and directory the build reads (name, size, mtime: an edit, a
// new, deleted or renamed file, a checkout of another commit all change it). It is taken before
// compiling, so a file edited during a build makes the next start build again.
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { cpSync, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'

const STAMP = 'dist/.sources'
const SOURCE_DIRS = ['plugins', 'routes', 'schemas', 'services']
const SOURCE_FILES = ['package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json', 'scripts/build.mjs']

function fingerprint() {
  const hash = createHash('sha256')
  const add = (path) => {
    const s = statSync(path)
    hash.update(`${path}\0${s.size}\0${s.mtimeMs}\n`)
    return s
  }
  const walk = (dir) => {
    add(dir)
    for (const entry of readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const path = join(dir, entry.name)
      if (entry.isDirectory()) walk(path)
      else add(path)
    }
  }
  for (const name of readdirSync('.').filter((n) => n.endsWith('.ts')).sort()) add(name)
  for (const file of SOURCE_FILES) if (existsSync(file)) add(file)
  for (const dir of SOURCE_DIRS) walk(dir)
  return hash.digest('hex')
}

const sources = fingerprint()
const current = existsSync(STAMP) && readFileSync(STAMP, 'utf8') === sources
if (process.argv.includes('--check')) process.exit(current ? 0 : 1)
if (process.argv.includes('--if-stale')) {
  if (current) process.exit(0)
  process.stderr.write('dist/ is missing or was built from other sources: building\n')
}

const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')
try {
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { stdio: 'inherit' })
} catch (err) {
  process.exit(err.status ?? 1) // tsc has printed why
}
cpSync('services/kernels/drivers', 'dist/services/kernels/drivers', { recursive: true })
cpSync('services/kernels/seccomp_filter.py', 'dist/services/kernels/seccomp_filter.py')
writeFileSync(STAMP, sources)
