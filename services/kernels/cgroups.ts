import { constants } from 'node:fs'
import { access, mkdir, readdir, readFile, rmdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { readStat } from './processes.js'

/**
 * A control group per kernel, so memory (tmpfs pages included), the number of processes and the
 * CPU share are limits of the kernel as a whole rather than of each of its processes.
 *
 * Both layouts are handled: cgroup v2 (`/sys/fs/cgroup` is a cgroup2 mount) and v1, including the
 * hybrid layout (v1 controllers plus a v2 `unified` mount without them), where each controller has
 * a hierarchy of its own. Groups are made below the server's own group (from /proc/self/cgroup):
 * `<own>/oi-kernels/<server>/<kernel>`, `<server>` being `<pid>-<start time>` so that groups left
 * by a killed server are recognised and removed at the next start.
 *
 * Nothing here is required: what the host does not offer (no write access, a controller missing)
 * is reported through `enforcement` and the kernels run with per-process rlimits only.
 */

export type Controller = 'memory' | 'pids' | 'cpu'
const CONTROLLERS: Controller[] = ['memory', 'pids', 'cpu']

export interface CgroupLimits {
  memoryBytes: number
  maxProcesses: number
  /** Relative CPU weight, 1–10000 as in cgroup v2 (`cpu.weight`, default 100). */
  cpuWeight: number
}

export interface CgroupEnforcement {
  layout: 'v2' | 'v1' | 'none'
  /** Controllers whose limit each kernel gets. */
  enforced: Controller[]
  /** Why the others are not enforced. */
  missing: Partial<Record<Controller, string>>
}

/** One kernel's group: the launcher writes its pid to each `procsFiles` entry before it execs. */
export interface KernelCgroup {
  procsFiles: string[]
  /** Processes still in the group (host pids). */
  pids(): Promise<number[]>
  /** True when the memory limit was hit and the kernel's OOM killer ran in this group. */
  oomKilled(): Promise<boolean>
  /** Removes the group once its processes are gone; errors are returned, not thrown. */
  remove(): Promise<Error | undefined>
}

const ROOT = '/sys/fs/cgroup'
const PARENT = 'oi-kernels'

interface Hierarchy {
  /** Directory of this server's groups (created on first use). */
  dir: string
  controllers: Controller[]
}

const writable = (path: string) =>
  access(path, constants.W_OK).then(
    () => true,
    () => false,
  )

/** `<pid>-<start time in clock ticks>`: unique to a process for the life of the host. */
export function processTag(pid: number): string | undefined {
  try {
    const stat = readStat(pid)
    return stat && `${pid}-${stat.startTime}`
  } catch {
    return undefined
  }
}

/** True when `tag` names a process that is still running. */
export function processAlive(tag: string): boolean {
  const pid = Number(tag.split('-')[0])
  return Number.isInteger(pid) && processTag(pid) === tag
}

async function ownGroups(): Promise<Map<string, string>> {
  const groups = new Map<string, string>()
  for (const line of (await readFile('/proc/self/cgroup', 'utf8')).split('\n')) {
    const [, list, path] = /^\d+:([^:]*):(.*)$/.exec(line) ?? []
    if (list === undefined || path === undefined) continue
    for (const name of list === '' ? [''] : list.split(',')) groups.set(name, path)
  }
  return groups
}

export class Cgroups {
  private counter = 0

  private constructor(
    readonly enforcement: CgroupEnforcement,
    private readonly hierarchies: Hierarchy[],
    private readonly layout: 'v1' | 'v2' | 'none',
  ) {}

  /** Finds what the host offers; never throws. */
  static async detect(log?: { warn(obj: object, msg?: string): void }): Promise<Cgroups> {
    const tag = processTag(process.pid) ?? String(process.pid)
    try {
      const own = await ownGroups()
      const v2 = await readFile(join(ROOT, 'cgroup.controllers'), 'utf8').catch(() => undefined)
      const found = v2 !== undefined ? await detectV2(own.get('') ?? '/', tag) : await detectV1(own, tag)
      const missing: CgroupEnforcement['missing'] = {}
      for (const controller of CONTROLLERS) if (!found.hierarchies.some((h) => h.controllers.includes(controller))) missing[controller] = found.reasons[controller] ?? 'not available'
      const enforced = CONTROLLERS.filter((c) => missing[c] === undefined)
      for (const hierarchy of found.hierarchies) await removeStale(join(hierarchy.dir, '..'), log)
      return new Cgroups({ layout: enforced.length > 0 ? found.layout : 'none', enforced, missing }, found.hierarchies, found.layout)
    } catch (err) {
      const reason = (err as Error).message
      return new Cgroups({ layout: 'none', enforced: [], missing: { memory: reason, pids: reason, cpu: reason } }, [], 'none')
    }
  }

  /** Makes the group for one kernel with its limits; undefined when no controller is available. */
  async create(name: string, limits: CgroupLimits): Promise<KernelCgroup | undefined> {
    if (this.hierarchies.length === 0) return undefined
    const id = `${name.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 80)}-${++this.counter}`
    const dirs: string[] = []
    try {
      for (const hierarchy of this.hierarchies) {
        const dir = join(hierarchy.dir, id)
        await mkdir(dir, { recursive: true })
        dirs.push(dir)
        for (const [file, value, optional] of limitFiles(this.layout, hierarchy.controllers, limits)) {
          await writeFile(join(dir, file), value).catch((err: NodeJS.ErrnoException) => {
            if (!optional || err.code !== 'ENOENT') throw err
          })
        }
      }
    } catch (err) {
      await Promise.all(dirs.map((dir) => rmdir(dir).catch(() => {})))
      throw err
    }
    return kernelCgroup(this.layout, dirs, this.hierarchies)
  }

  /** Removes this server's (by then empty) groups. */
  async close(): Promise<void> {
    for (const hierarchy of this.hierarchies) await rmdir(hierarchy.dir).catch(() => {})
  }
}

/** [file, value, optional] triples, written in order. */
function limitFiles(layout: 'v1' | 'v2' | 'none', controllers: Controller[], limits: CgroupLimits): [string, string, boolean][] {
  const files: [string, string, boolean][] = []
  const bytes = String(limits.memoryBytes)
  if (controllers.includes('memory')) {
    // Swap would stretch the limit; the swap files exist only with swap accounting. memsw (memory
    // plus swap) must not be set below the plain limit, hence the order.
    if (layout === 'v2') files.push(['memory.max', bytes, false], ['memory.swap.max', '0', true])
    else files.push(['memory.limit_in_bytes', bytes, false], ['memory.memsw.limit_in_bytes', bytes, true])
  }
  if (controllers.includes('pids')) files.push(['pids.max', String(limits.maxProcesses), false])
  if (controllers.includes('cpu')) {
    // v1 shares: 1024 is the default weight, as 100 is for v2.
    if (layout === 'v2') files.push(['cpu.weight', String(limits.cpuWeight), false])
    else files.push(['cpu.shares', String(Math.max(2, Math.round((limits.cpuWeight * 1024) / 100))), false])
  }
  return files
}

function kernelCgroup(layout: 'v1' | 'v2' | 'none', dirs: string[], hierarchies: Hierarchy[]): KernelCgroup {
  const memoryDir = dirs[hierarchies.findIndex((h) => h.controllers.includes('memory'))]
  return {
    procsFiles: dirs.map((dir) => join(dir, 'cgroup.procs')),
    async pids() {
      const all = new Set<number>()
      for (const dir of dirs) {
        const text = await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => '')
        for (const line of text.split('\n')) if (line) all.add(Number(line))
      }
      return [...all]
    },
    async oomKilled() {
      if (!memoryDir) return false
      const file = layout === 'v2' ? 'memory.events' : 'memory.oom_control'
      const text = await readFile(join(memoryDir, file), 'utf8').catch(() => '')
      return /^oom_kill [1-9]/m.test(text)
    },
    async remove() {
      let failure: Error | undefined
      for (const dir of dirs) {
        // The last processes may take a moment to be reaped after SIGKILL.
        for (let attempt = 0; ; attempt++) {
          try {
            await rmdir(dir)
            break
          } catch (err) {
            const code = (err as NodeJS.ErrnoException).code
            if (code === 'ENOENT') break
            if (code !== 'EBUSY' || attempt >= 50) {
              failure = err as Error
              break
            }
            await new Promise((resolve) => setTimeout(resolve, 20))
          }
        }
      }
      return failure
    },
  }
}

interface Detected {
  layout: 'v1' | 'v2'
  hierarchies: Hierarchy[]
  reasons: Partial<Record<Controller, string>>
}

async function detectV1(own: Map<string, string>, tag: string): Promise<Detected> {
  const hierarchies: Hierarchy[] = []
  const reasons: Detected['reasons'] = {}
  for (const controller of CONTROLLERS) {
    const path = own.get(controller)
    const mount = join(ROOT, controller)
    if (path === undefined) {
      reasons[controller] = `no cgroup v1 ${controller} hierarchy`
      continue
    }
    const base = join(mount, path)
    if (!(await writable(base))) {
      reasons[controller] = `${base} is not writable by this process`
      continue
    }
    hierarchies.push({ dir: join(base, PARENT, tag), controllers: [controller] })
  }
  return { layout: 'v1', hierarchies, reasons }
}

/**
 * cgroup v2 allows controllers in a child only when its parent has no processes of its own: when
 * the server's group holds processes, the server moves itself into a leaf `oi-server` first, as
 * container init systems do, then enables the controllers for its subtree.
 */
async function detectV2(path: string, tag: string): Promise<Detected> {
  const base = join(ROOT, path)
  const reasons: Detected['reasons'] = {}
  const available = (await readFile(join(base, 'cgroup.controllers'), 'utf8')).trim().split(/\s+/)
  const wanted = CONTROLLERS.filter((c) => available.includes(c))
  for (const c of CONTROLLERS) if (!wanted.includes(c)) reasons[c] = `the ${c} controller is not delegated to ${base}`
  if (wanted.length === 0 || !(await writable(join(base, 'cgroup.subtree_control')))) {
    const reason = wanted.length === 0 ? undefined : `${base} is not writable by this process`
    if (reason) for (const c of wanted) reasons[c] = reason
    return { layout: 'v2', hierarchies: [], reasons }
  }
  const enable = async (dir: string) => writeFile(join(dir, 'cgroup.subtree_control'), wanted.map((c) => `+${c}`).join(' '))
  try {
    await enable(base)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EBUSY') throw err
    const leaf = join(base, 'oi-server')
    await mkdir(leaf, { recursive: true })
    for (const pid of (await readFile(join(base, 'cgroup.procs'), 'utf8')).split('\n').filter(Boolean)) {
      await writeFile(join(leaf, 'cgroup.procs'), pid).catch(() => {})
    }
    await enable(base)
  }
  const parent = join(base, PARENT)
  await mkdir(parent, { recursive: true })
  await enable(parent)
  const dir = join(parent, tag)
  await mkdir(dir, { recursive: true })
  await enable(dir)
  return { layout: 'v2', hierarchies: [{ dir, controllers: wanted }], reasons }
}

/** Removes the groups of servers that are gone (their kernels died with them). */
async function removeStale(parent: string, log?: { warn(obj: object, msg?: string): void }): Promise<void> {
  for (const tag of await readdir(parent).catch(() => [] as string[])) {
    if (processAlive(tag)) continue
    const dir = join(parent, tag)
    for (const child of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (child.isDirectory()) await rmdir(join(dir, child.name)).catch((err) => log?.warn({ err, dir }, 'stale kernel cgroup not removed'))
    }
    await rmdir(dir).catch(() => {})
  }
}
