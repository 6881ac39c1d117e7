import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from 'kysely'
import type { Database } from './kysely-store.js'

export type Engine = 'sqlite' | 'postgres'

/**
 * Migrations live in code so the build ships no SQL files and nothing is read from disk at run
 * time. A migration is never edited once released; schema changes get a new entry.
 */
function migrations(engine: Engine): Record<string, Migration> {
  // Ids and timestamps are compared and sorted as text. PostgreSQL would use the database's
  // locale for that; "C" gives the byte order SQLite uses, and lets the indexes serve range scans.
  const text = engine === 'postgres' ? sql`text collate "C"` : sql`text`

  return {
    '001_initial': {
      async up(db) {
        await db.schema
          .createTable('sessions')
          .addColumn('id', text, (col) => col.primaryKey())
          .addColumn('tenant_id', text, (col) => col.notNull())
          .addColumn('title', text)
          .addColumn('metadata', text, (col) => col.notNull())
          .addColumn('model', text, (col) => col.notNull())
          .addColumn('created_at', text, (col) => col.notNull())
          .addColumn('updated_at', text, (col) => col.notNull())
          .addColumn('message_count', 'integer', (col) => col.notNull().defaultTo(0))
          .addColumn('message_seq', 'integer', (col) => col.notNull().defaultTo(0))
          .addColumn('event_seq', 'integer', (col) => col.notNull().defaultTo(0))
          .execute()
        await db.schema
          .createIndex('sessions_tenant_created_idx')
          .on('sessions')
          .columns(['tenant_id', 'created_at desc', 'id desc'])
          .execute()
        await db.schema.createIndex('sessions_updated_idx').on('sessions').column('updated_at').execute()

        await db.schema
          .createTable('messages')
          .addColumn('session_id', text, (col) => col.notNull().references('sessions.id'))
          .addColumn('seq', 'integer', (col) => col.notNull())
          .addColumn('id', text, (col) => col.notNull())
          .addColumn('role', text, (col) => col.notNull())
          .addColumn('type', text, (col) => col.notNull())
          .addColumn('format', text)
          .addColumn('stream', text)
          .addColumn('recipient', text)
          .addColumn('content', text, (col) => col.notNull())
          .addColumn('content_json', 'integer', (col) => col.notNull().defaultTo(0))
          .addColumn('created_at', text, (col) => col.notNull())
          .addPrimaryKeyConstraint('messages_pk', ['session_id', 'seq'])
          .execute()
        await db.schema.createIndex('messages_session_id_idx').on('messages').columns(['session_id', 'id']).execute()

        await db.schema
          .createTable('events')
          .addColumn('session_id', text, (col) => col.notNull().references('sessions.id'))
          .addColumn('id', 'integer', (col) => col.notNull())
          .addColumn('type', text, (col) => col.notNull())
          .addColumn('data', text, (col) => col.notNull())
          .addColumn('created_at', text, (col) => col.notNull())
          .addPrimaryKeyConstraint('events_pk', ['session_id', 'id'])
          .execute()

        await db.schema
          .createTable('api_keys')
          .addColumn('id', text, (col) => col.primaryKey())
          .addColumn('name', text, (col) => col.notNull())
          .addColumn('prefix', text, (col) => col.notNull())
          .addColumn('hash', text, (col) => col.notNull().unique())
          .addColumn('created_at', text, (col) => col.notNull())
          .addColumn('expires_at', text)
          .addColumn('last_used_at', text)
          .execute()

        await db.schema
          .createTable('settings')
          .addColumn('tenant_id', text, (col) => col.primaryKey())
          .addColumn('data', text, (col) => col.notNull())
          .addColumn('updated_at', text, (col) => col.notNull())
          .execute()

        await db.schema
          .createTable('secrets')
          .addColumn('tenant_id', text, (col) => col.notNull())
          .addColumn('name', text, (col) => col.notNull())
          .addColumn('ciphertext', text, (col) => col.notNull())
          .addColumn('created_at', text, (col) => col.notNull())
          .addColumn('updated_at', text, (col) => col.notNull())
          .addPrimaryKeyConstraint('secrets_pk', ['tenant_id', 'name'])
          .execute()
      },
    },
    '002_suspended_turns': {
      async up(db) {
        await db.schema
          .createTable('suspended_turns')
          .addColumn('session_id', text, (col) => col.primaryKey().references('sessions.id'))
          .addColumn('id', text, (col) => col.notNull())
          .addColumn('reason', text, (col) => col.notNull())
          .addColumn('state', text, (col) => col.notNull())
          .addColumn('created_at', text, (col) => col.notNull())
          .execute()
      },
    },
    '003_responses': {
      async up(db) {
        await db.schema
          .createTable('responses')
          .addColumn('id', text, (col) => col.primaryKey())
          .addColumn('tenant_id', text, (col) => col.notNull())
          .addColumn('session_id', text, (col) => col.notNull().references('sessions.id'))
          .addColumn('previous_response_id', text)
          .addColumn('status', text, (col) => col.notNull())
          .addColumn('created_at', text, (col) => col.notNull())
          .addColumn('response', text, (col) => col.notNull())
          .addColumn('input', text, (col) => col.notNull())
          .addColumn('messages', text, (col) => col.notNull())
          .execute()
        await db.schema.createIndex('responses_session_idx').on('responses').column('session_id').execute()
        await db.schema
          .createTable('response_items')
          .addColumn('tenant_id', text, (col) => col.notNull())
          .addColumn('id', text, (col) => col.notNull())
          .addColumn('response_id', text, (col) => col.notNull().references('responses.id'))
          .addColumn('item', text, (col) => col.notNull())
          .addPrimaryKeyConstraint('response_items_pk', ['tenant_id', 'id'])
          .execute()
        await db.schema.createIndex('response_items_response_idx').on('response_items').column('response_id').execute()
      },
    },
    // Lease fencing between replicas (services/cluster/leases.ts).
    '004_owner_fence': {
      async up(db) {
        await db.schema.alterTable('sessions').addColumn('owner_fence', 'integer', (col) => col.notNull().defaultTo(0)).execute()
      },
    },
  }
}

/**
 * Brings the schema to the latest version. Kysely's migrator holds a lock while it runs, so
 * replicas starting together against one PostgreSQL apply each migration once.
 */
export async function migrate(db: Kysely<Database>, engine: Engine): Promise<void> {
  const provider: MigrationProvider = { getMigrations: async () => migrations(engine) }
  const { error, results } = await new Migrator({ db, provider }).migrateToLatest()
  if (error === undefined) return
  const failed = results?.find((result) => result.status === 'Error')?.migrationName
  const reason = error instanceof Error ? error.message : String(error)
  throw new Error(
    `Database migration ${failed ? `"${failed}" ` : ''}failed on ${engine}: ${reason}`,
    { cause: error },
  )
}
