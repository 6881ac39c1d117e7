import { spawnSync } from 'node:child_process'
import { cpSync, readdirSync, realpathSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'

// A copy of what the build reads, so the test never touches the checkout's dist/.
function checkout(t: Test): string {
  const dir = t.testdir({})
  for (const name of readdirSync('.').filter((n) => n.endsWith('.ts'))) cpSync(name, join(dir, name))
  for (const path of ['plugins', 'routes', 'schemas', 'services', 'package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json', 'scripts/build.mjs'])
    cpSync(path, join(dir, path), { recursive: true })
  symlinkSync(realpathSync('node_modules'), join(dir, 'node_modules'))
  return dir
}

const build = (dir: string, ...args: string[]) => spawnSync(process.execPath, ['scripts/build.mjs', ...args], { cwd: dir, encoding: 'utf8' })

t.test('npm start builds only when the sources changed since the last build', async (t) => {
  const dir = checkout(t)
  t.equal(build(dir, '--check').status, 1, 'no dist/ yet: stale')
  const first = build(dir, '--if-stale')
  t.equal(first.status, 0, first.stderr)
  t.match(first.stderr, /building/)
  t.ok(statSync(join(dir, 'dist/cli.js')).isFile())
  t.ok(statSync(join(dir, 'dist/services/kernels/seccomp_filter.py')).isFile(), 'the assets are copied')
  t.equal(build(dir, '--check').status, 0, 'current after a build')

  const compiled = statSync(join(dir, 'dist/cli.js')).mtimeMs
  const again = build(dir, '--if-stale')
  t.equal(again.status, 0)
  t.equal(again.stderr, '', 'a current dist/ is not rebuilt')
  t.equal(statSync(join(dir, 'dist/cli.js')).mtimeMs, compiled, 'nothing was compiled')

  const edited = join(dir, 'services/version.ts')
  const { atime, mtime } = statSync(edited)
  utimesSync(edited, atime, new Date(mtime.getTime() + 1000))
  t.equal(build(dir, '--check').status, 1, 'an edited source')
  t.equal(build(dir).status, 0)
  t.equal(build(dir, '--check').status, 0)

  writeFileSync(join(dir, 'routes/new-route.ts'), 'export {}\n')
  t.equal(build(dir, '--check').status, 1, 'a new source')

  writeFileSync(join(dir, 'dist/.sources'), 'something else')
  t.equal(build(dir, '--check').status, 1, 'a dist/ built from other sources')
})

t.test('a failed compile exits with its status and records nothing', async (t) => {
  const dir = checkout(t)
  writeFileSync(join(dir, 'routes/broken.ts'), 'const x: number = "no"\n')
  const r = build(dir)
  t.not(r.status, 0)
  t.match(r.stdout, /broken\.ts/)
  t.equal(build(dir, '--check').status, 1, 'still stale: the next start builds again')
})
