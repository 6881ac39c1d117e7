#!/usr/bin/env node
// Usage: node scripts/leftover-processes.mjs [--kill] MARKER DIR...
// Lists the processes a test run left behind: those whose environment holds MARKER (a NAME=value
// pair the run exported), or whose working directory or command line lies under one of the DIRs
// (the checkout, the run's TMPDIR: bwrap names the workspaces it binds). This process and its
// ancestors (the CI script) are not counted. Exits 1 and prints them when there are any; with
// --kill it also sends them SIGKILL, so CI does not leave them running either.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs'

const args = process.argv.slice(2)
const kill = args[0] === '--kill'
if (kill) args.shift()
const [marker, ...dirs] = args
if (!marker?.includes('=') || dirs.length === 0) {
  process.stderr.write('usage: leftover-processes.mjs [--kill] NAME=value DIR...\n')
  process.exit(2)
}

const read = (path) => {
  try {
    return readFileSync(path, 'utf8')
  } catch {
    return ''
  }
}
const parentOf = (pid) => Number(read(`/proc/${pid}/stat`).split(') ')[1]?.split(' ')[1] ?? 0)

const ours = new Set()
for (let pid = process.pid; pid > 1; pid = parentOf(pid)) ours.add(pid)

const under = (path) => dirs.some((dir) => path === dir || path.startsWith(`${dir}/`))
const left = []
for (const name of readdirSync('/proc')) {
  const pid = Number(name)
  if (!Number.isInteger(pid) || ours.has(pid)) continue
  const cmdline = read(`/proc/${pid}/cmdline`).split('\0').filter(Boolean)
  if (cmdline.length === 0) continue // kernel threads and zombies
  let cwd = ''
  try {
    cwd = readlinkSync(`/proc/${pid}/cwd`)
  } catch {
    // gone meanwhile, or not ours to inspect: judged by the rest
  }
  const marked = read(`/proc/${pid}/environ`).split('\0').includes(marker)
  if (marked || under(cwd) || cmdline.some((arg) => under(arg) || dirs.some((dir) => arg.includes(`${dir}/`)))) {
    left.push({ pid, cmdline: cmdline.join(' ') })
  }
}

if (left.length > 0) {
  process.stderr.write(`${left.length} process(es) outlived the tests:\n`)
  for (const { pid, cmdline } of left) process.stderr.write(`  ${pid} ${cmdline.slice(0, 300)}\n`)
  if (kill) {
    for (const { pid } of left) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // already gone
      }
    }
  }
  process.exit(1)
}
