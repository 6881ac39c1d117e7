import { readFileSync } from 'node:fs'
import semver from 'semver'
import t from 'tap'

const pkg = JSON.parse(readFileSync('package.json', 'utf8'))
const lock = JSON.parse(readFileSync('package-lock.json', 'utf8'))

// `npm ci` warns EBADENGINE when a locked package refuses the running Node: check them all against
// the oldest Node that package.json promises, so the promise holds for every version it covers.
t.test('every locked package supports the oldest Node that engines allows', async (t) => {
  const oldest = semver.minVersion(pkg.engines.node)
  t.ok(oldest, `engines.node ${pkg.engines.node}`)
  // any release of that major line will do (a package may need a recent 20.x)
  const major = `${oldest!.major}.999.999`
  const refusing = Object.entries(lock.packages as Record<string, { version?: string; engines?: { node?: string } }>)
    .filter(([path, info]) => path && typeof info.engines?.node === 'string')
    .filter(([, info]) => !semver.satisfies(major, info.engines!.node!))
    .map(([path, info]) => `${path.replace(/^.*node_modules\//, '')}@${info.version} needs node ${info.engines!.node}`)
  t.same(refusing, [], `packages that refuse Node ${oldest!.major}`)
})
