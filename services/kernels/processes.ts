import { readdirSync, readFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'

export interface ProcStat {
  pid: number
  ppid: number
  state: string
  /** Start time after boot, in clock ticks: with the pid, it names one process for the host's life. */
  startTime: string
}

/** A process's /proc/PID/stat; undefined when it is gone. Throws on any other read error. */
export function readStat(pid: number): ProcStat | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // The command name sits in parentheses and may itself contain spaces and parentheses.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ')
    return { pid, state: fields[0] ?? '', ppid: Number(fields[1]), startTime: fields[19] ?? '' }
  } catch (err) {
    // the process exited between readdir and read; anything else (EMFILE, EACCES) must not
    // silently shrink the tree, or a kill would miss processes
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT' || code === 'ESRCH') return undefined
    throw err
  }
}

/**
 * Read one file at a time, synchronously: /proc reads are in-kernel and take microseconds, and
 * opening every stat file at once ran out of descriptors when several scans overlapped.
 */
async function allProcesses(): Promise<ProcStat[]> {
  const stats: ProcStat[] = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    const stat = readStat(Number(name))
    if (stat) stats.push(stat)
  }
  return stats
}

/** Every live process below `root` in the process tree (not `root` itself). */
export async function descendants(root: number): Promise<number[]> {
  const children = new Map<number, number[]>()
  for (const { pid, ppid, state } of await allProcesses()) {
    if (state === 'Z') continue
    children.set(ppid, [...(children.get(ppid) ?? []), pid])
  }
  const found: number[] = []
  const queue = [root]
  for (let pid = queue.shift(); pid !== undefined; pid = queue.shift()) {
    for (const child of children.get(pid) ?? []) {
      found.push(child)
      queue.push(child)
    }
  }
  return found
}

/**
 * The host pid of the process under `root` that sees itself as `nsPid` in its own pid namespace
 * (the last NSpid entry): how the manager finds a sandboxed driver to signal it.
 */
export async function hostPidOf(root: number, nsPid: number): Promise<number | undefined> {
  for (const pid of [root, ...(await descendants(root))]) {
    try {
      const status = await readFile(`/proc/${pid}/status`, 'utf8')
      const line = status.split('\n').find((l) => l.startsWith('NSpid:'))
      const ids = line?.slice('NSpid:'.length).trim().split(/\s+/).map(Number) ?? [pid]
      if (ids.at(-1) === nsPid) return pid
    } catch {
      // The process ended while we looked.
    }
  }
  return undefined
}

const isGone = async (pid: number) => {
  const stat = await readStat(pid)
  return stat === undefined || stat.state === 'Z'
}

/** Waits until none of `pids` is running (zombies count as gone); false on timeout. */
export async function waitGone(pids: number[], timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  let left = pids
  while (left.length > 0) {
    const alive = await Promise.all(left.map(async (pid) => ((await isGone(pid)) ? undefined : pid)))
    left = alive.filter((pid): pid is number => pid !== undefined)
    if (left.length === 0) return true
    if (Date.now() > deadline) return false
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return true
}
