import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'

const SOURCES = ['app.ts', 'plugins', 'routes', 'services']

function files(path: string): string[] {
  if (path.endsWith('.ts')) return [path]
  return readdirSync(path, { withFileTypes: true }).flatMap((e) => (e.isDirectory() || e.name.endsWith('.ts') ? files(join(path, e.name)) : []))
}

// Every way the code names an error code: new ApiError(status, type, code, …), the client-error
// table ([status, code, message]), invalidRequest(message, param, code) and `code: '…'` literals.
const PATTERNS = [
  /ApiError\(\d{3}, '[a-z_]+', '([a-z_]+)'/g,
  /\[\d{3}, '([a-z_]+)', /g,
  /invalidRequest\((?:'[^']*'|`[^`]*`|\w+), (?:'[^']*'|`[^`]*`|\w+|null), '([a-z_]+)'\)/g,
  /\bcode: '([a-z_]+)'/g,
]

t.test("every error code the server can return is in the README's error table", async (t) => {
  const codes = new Set<string>()
  for (const file of SOURCES.flatMap(files)) {
    const source = readFileSync(file, 'utf8')
    for (const pattern of PATTERNS) for (const match of source.matchAll(pattern)) codes.add(match[1]!)
  }
  t.ok(codes.size >= 20, `${codes.size} codes found in the sources`)
  const readme = readFileSync('README.md', 'utf8')
  const start = readme.indexOf('| status | type | code')
  t.ok(start > 0, 'the README has an error table')
  const table = readme.slice(start, readme.indexOf('\n\n', start))
  const missing = [...codes].filter((code) => !table.includes(`\`${code}\``)).sort()
  t.same(missing, [], 'codes missing from the table')
})
