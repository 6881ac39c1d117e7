import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { randomUUID } from 'node:crypto'
import t from 'tap'

const check = (...args: string[]) => spawnSync(process.execPath, ['scripts/leftover-processes.mjs', ...args], { encoding: 'utf8' })

t.test('a process carrying the marker or working in a watched directory is reported, and killed on request', async (t) => {
  const marker = `OI_CI_RUN=${randomUUID()}`
  const dir = t.testdir({})
  const marked = spawn('sleep', ['300'], { env: { ...process.env, OI_CI_RUN: marker.split('=')[1] }, stdio: 'ignore' })
  const inDir = spawn('sleep', ['301'], { cwd: dir, env: {}, stdio: 'ignore' })
  t.teardown(() => {
    marked.kill('SIGKILL')
    inDir.kill('SIGKILL')
  })

  const found = check(marker, dir)
  t.equal(found.status, 1)
  t.match(found.stderr, /2 process\(es\) outlived the tests/)
  t.match(found.stderr, new RegExp(`^  ${marked.pid} sleep 300$`, 'm'))
  t.match(found.stderr, new RegExp(`^  ${inDir.pid} sleep 301$`, 'm'))
  t.notMatch(found.stderr, new RegExp(`^  ${process.pid} `, 'm'), 'the caller and its ancestors are not counted')

  const exited = Promise.all([once(marked, 'exit'), once(inDir, 'exit')])
  t.equal(check('--kill', marker, dir).status, 1)
  await exited
  t.equal(check(marker, dir).status, 0, 'nothing is left once they are killed')
})

t.test('another run, with another marker and directories, is not counted', async (t) => {
  const other = spawn('sleep', ['300'], { env: { ...process.env, OI_CI_RUN: 'another-run' }, stdio: 'ignore' })
  t.teardown(() => other.kill('SIGKILL'))
  const result = check(`OI_CI_RUN=${randomUUID()}`, t.testdir({}))
  t.equal(result.status, 0, result.stderr)
})
