import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import Sqlite from 'better-sqlite3'
import { PostgresDialect, SqliteDialect, type SqliteDatabase } from 'kysely'
import pg from 'pg'
import { KyselyStore } from './kysely-store.js'
import { PostgresRunner, SqliteRunner } from './statements.js'
import type { Store } from './types.js'

export type { Store } from './types.js'

const POSTGRES_URL = /^postgres(ql)?:\/\//i
const STATEMENT_CACHE_SIZE = 500

/**
 * PostgreSQL when `databaseUrl` is a postgres:// URL (replicas share it), otherwise an embedded
 * SQLite file in `dataDir`. Call `migrate()` on the result before use.
 */
export function createStore(opts: { databaseUrl?: string; dataDir: string }): Store {
  if (opts.databaseUrl) {
    if (POSTGRES_URL.test(opts.databaseUrl)) return createPostgresStore(opts.databaseUrl)
    // Falling back to SQLite here would split replicas that were meant to share one database.
    throw new Error('DATABASE_URL must start with postgres:// or postgresql:// (leave it unset for SQLite)')
  }
  // The directory also holds workspaces and the secrets key: only the server's user may enter it.
  mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 })
  return createSqliteStore(join(opts.dataDir, 'oi-server.db'))
}

export function createSqliteStore(file: string): Store {
  const database = new Sqlite(file)
  // In WAL mode with synchronous=NORMAL a commit is in the WAL file once the write returns, so a
  // killed process (even SIGKILL) loses nothing it acknowledged; only an OS crash or power cut
  // can drop the last transactions. FULL would fsync every commit for that case alone.
  database.pragma('journal_mode = WAL')
  database.pragma('synchronous = NORMAL')
  database.pragma('busy_timeout = 5000')
  database.pragma('foreign_keys = ON')
  return new KyselyStore('sqlite', new SqliteDialect({ database: withStatementCache(database, STATEMENT_CACHE_SIZE) }), new SqliteRunner(database))
}

/**
 * Kysely's SQLite driver calls `prepare` for every query, and compiling the SQL costs more than
 * running a small indexed query. Kysely builds the same text for the same query shape (values
 * are bound parameters), so the statements are kept per text, least recently used out first.
 * Reuse is safe because the driver runs one query at a time and finishes `all()`/`run()`
 * synchronously; only a streamed query (`iterate()`) holds its statement across awaits, so a
 * statement still `busy` with one is never handed out again: that caller gets a fresh one.
 */
function withStatementCache(database: Sqlite.Database, size: number): SqliteDatabase {
  const statements = new Map<string, Sqlite.Statement>()
  return {
    prepare(sql) {
      const cached = statements.get(sql)
      if (cached) {
        if (cached.busy) return database.prepare(sql)
        statements.delete(sql)
        statements.set(sql, cached)
        return cached
      }
      const statement = database.prepare(sql)
      statements.set(sql, statement)
      if (statements.size > size) statements.delete(statements.keys().next().value!)
      return statement
    },
    close() {
      statements.clear()
      database.close()
    },
  }
}

export function createPostgresStore(url: string): Store {
  // A database that does not answer fails the request (503) instead of holding it.
  const pool = new pg.Pool({ connectionString: url, max: 10, connectionTimeoutMillis: 5000, keepAlive: true })
  // An idle client that loses its server emits here; without a listener that kills the process.
  // The pool discards the client and the next query reports the outage where it can be handled.
  pool.on('error', () => {})
  return new KyselyStore('postgres', new PostgresDialect({ pool }), new PostgresRunner(pool))
}
