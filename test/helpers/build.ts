import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { type AppOptions, buildApp } from '../../app.js'
import { loadConfig } from '../../config.js'

export const ADMIN_KEY = 'test-admin-key'
export const auth = (key = ADMIN_KEY) => ({ authorization: `Bearer ${key}` })

export type Tap = { teardown(fn: () => unknown): void }

/** A fresh temporary directory removed when the test ends. */
export function tempDir(t: Tap, prefix = 'oi-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/**
 * The app as the server builds it, on a temporary SQLite store, with an admin key and quiet
 * logs. `env` overrides any setting exactly as the environment would.
 */
export async function build(t: Tap, env: Record<string, string> = {}, opts: AppOptions = {}): Promise<FastifyInstance> {
  const config = loadConfig({
    API_KEY: ADMIN_KEY,
    DATA_DIR: tempDir(t),
    RATE_LIMIT_PER_MINUTE: '1000',
    SESSION_RATE_LIMIT_PER_MINUTE: '1000',
    ...env,
  })
  const app = await buildApp(config, opts)
  t.teardown(() => app.close())
  return app
}

export type { FastifyInstance }
