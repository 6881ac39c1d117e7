import { randomBytes } from 'node:crypto'
import pg from 'pg'
import type { Tap } from './build.js'

/**
 * A database of its own on the server at `adminUrl`, dropped when the test ends, so a test never
 * meets rows from other runs or other test files. Returns its URL.
 */
export async function freshDatabase(t: Tap, adminUrl: string, prefix: string): Promise<string> {
  const name = `${prefix}_${randomBytes(6).toString('hex')}`
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  const admin = new pg.Client({ connectionString: adminUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  t.teardown(async () => {
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await admin.end()
  })
  return url.href
}
