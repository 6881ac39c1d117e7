import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import type { Config } from '../config.js'
import { KernelManager } from '../services/kernels/manager.js'
import { checkSandbox } from '../services/kernels/sandbox.js'
import { Workspaces } from '../services/workspaces.js'

declare module 'fastify' {
  interface FastifyInstance {
    kernels: KernelManager
    workspaces: Workspaces
    /** Whether code can run here: the sandbox probed once (again by each readiness check). */
    sandboxStatus: () => Promise<SandboxStatus>
  }
}

export type SandboxProbe = () => Promise<{ ok: boolean; reason?: string }>
export interface SandboxStatus {
  ok: boolean
  /** Why code cannot run, and what to do about it (when not ok). */
  reason?: string
  fix?: string
}

export const SANDBOX_FIX =
  'install bubblewrap (Debian: apt-get install bubblewrap) and allow unprivileged user namespaces ' +
  '(sysctl kernel.unprivileged_userns_clone=1; in Docker the --security-opt flags of the README), or set SANDBOX=none on a trusted host'

/**
 * Kernels and workspaces live under WORKSPACES_DIR (default DATA_DIR/workspaces). Deleting or expiring a session stops
 * its kernels and removes its workspace; closing the app kills every kernel.
 */
export default fp(
  async function kernels(app: FastifyInstance, { config, probe }: { config: Config; probe?: SandboxProbe }) {
    const workspacesDir = config.WORKSPACES_DIR ?? join(config.DATA_DIR, 'workspaces')
    const options = {
      workspacesDir,
      sandbox: config.SANDBOX,
      sandboxNetwork: config.SANDBOX_NETWORK,
      pythonBin: config.PYTHON_BIN,
      nodeBin: config.NODE_BIN,
      bashBin: config.BASH_BIN,
      idleSeconds: config.KERNEL_IDLE_SECONDS,
      maxKernels: config.MAX_KERNELS,
      maxKernelsPerTenant: config.MAX_KERNELS_PER_TENANT,
      execTimeoutMs: config.EXEC_TIMEOUT_MS,
      execGraceMs: config.EXEC_GRACE_MS,
      outputLimitBytes: config.EXEC_OUTPUT_LIMIT_BYTES,
      memoryMb: config.KERNEL_MEMORY_MB,
      maxProcesses: config.KERNEL_MAX_PROCESSES,
      maxFileMb: config.KERNEL_MAX_FILE_MB,
      maxOpenFiles: config.KERNEL_MAX_OPEN_FILES,
      tmpfsMb: config.KERNEL_TMPFS_MB,
      workspaceQuota: { maxBytes: config.WORKSPACE_MAX_MB * 1024 * 1024, maxFiles: config.WORKSPACE_MAX_FILES },
    }
    const manager = new KernelManager(options, app.log)
    const workspaces = new Workspaces(workspacesDir, { maxFileBytes: config.FILE_MAX_BYTES, quota: options.workspaceQuota })
    app.decorate('kernels', manager)
    app.decorate('workspaces', workspaces)

    if (config.SANDBOX === 'none')
      app.log.warn('SANDBOX=none: executed code runs WITHOUT isolation and can read this server\'s files and environment')

    // Probed on first need (the server asks right after it listens), not while the app is built.
    const probeSandbox = probe ?? (() => checkSandbox(options))
    let reported = false
    const check = async (): Promise<SandboxStatus> => {
      if (config.SANDBOX === 'none') return { ok: true }
      const result = await probeSandbox()
      if (result.ok) return { ok: true }
      const status = { ok: false, reason: result.reason ?? 'bubblewrap does not work on this host', fix: SANDBOX_FIX }
      if (!reported) app.log.error(`sandbox unusable, no code can run: ${status.reason}. Fix: ${status.fix}`)
      reported = true
      return status
    }
    let status: Promise<SandboxStatus> | undefined
    app.decorate('sandboxStatus', () => (status ??= check()))
    app.readiness.set('sandbox', async () => {
      status = check()
      const found = await status
      if (!found.ok) throw new Error(found.reason)
      return manager.enforcement()
    })
    // Not awaited: the server answers while the limits are probed; the kernels wait for them.
    void manager.enforcement().then((found) => {
      const missing = Object.entries(found.cgroups.missing).map(([controller, why]) => `${controller} (${why})`)
      app.log.info({ isolation: found }, 'kernel isolation')
      if (config.SANDBOX === 'bwrap' && !found.seccomp) app.log.warn(`kernels run WITHOUT a seccomp filter: ${found.seccompReason}`)
      if (missing.length > 0)
        app.log.warn(`per-kernel limits NOT enforced: ${missing.join(', ')}; only per-process rlimits apply (memory per process, processes per uid)`)
    }, (err) => app.log.error({ err }, 'kernel isolation could not be probed'))

    // The workspace goes even when stopping the kernels failed; either failure reaches the log.
    app.sessions.onDelete(async (sessionId) => {
      try {
        await manager.shutdownSession(sessionId)
      } finally {
        await workspaces.removeWorkspace(sessionId)
      }
    })
    const gauge = setInterval(() => app.metrics.liveKernels.set(manager.stats().live), 5000).unref()
    app.addHook('onClose', async () => {
      clearInterval(gauge)
      await manager.close()
    })
  },
  { name: 'kernels', dependencies: ['sessions', 'readiness', 'metrics'] },
)
