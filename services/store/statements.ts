import type Sqlite from 'better-sqlite3'
import type { Compilable } from 'kysely'
import type pg from 'pg'

/**
 * The store's hot path: statements whose SQL is built by Kysely once, at start, and then run
 * straight on the driver with new values. Building a query through Kysely's builder and compiler
 * costs more than SQLite takes to run a small indexed statement, and a turn runs a dozen of them;
 * here a statement is prepared once (better-sqlite3's `prepare`, PostgreSQL's named prepared
 * statements, parsed once per connection) and each call only binds values.
 */

/** A compiled statement: its SQL and the names of its parameters, in placeholder order. */
export interface Statement {
  /** Unique per store; PostgreSQL's prepared-statement name. */
  readonly name: string
  readonly sql: string
  readonly params: readonly string[]
}

/** One statement to run with named values; the rows it returns (`RETURNING` included) come back. */
export interface Step {
  statement: Statement
  values: Record<string, unknown>
}

export type Row = Record<string, unknown>

/**
 * A transaction written once for both engines: a generator that yields each statement and
 * receives its rows. SQLite runs it synchronously inside one `BEGIN IMMEDIATE … COMMIT`, so no
 * other statement of this process can run in between; PostgreSQL runs it on one pooled client
 * between BEGIN and COMMIT. A throw rolls everything back.
 */
export type Plan<T> = Generator<Step, T, Row[]>

/** Runs statements and plans on one engine. */
export interface Runner {
  /** One statement in its own implicit transaction. */
  run(statement: Statement, values: Record<string, unknown>): Promise<Row[]>
  transaction<T>(plan: () => Plan<T>): Promise<T>
}

const MARK = '\u0000param:'

/**
 * Compiles `build(param)` once: `param(name)` stands for a value given at each run. Kysely puts
 * every value in its parameter list, in placeholder order, so the marker values name the
 * positions. Throws when the query has a value that is not a named parameter, which would
 * otherwise be frozen into every run.
 */
export function compile(name: string, build: (param: (name: string) => never) => Compilable): Statement {
  // typed `never` so that a marker fits wherever the builder expects a value
  const compiled = build((param: string) => `${MARK}${param}` as never).compile()
  const params = compiled.parameters.map((value) => {
    if (typeof value !== 'string' || !value.startsWith(MARK)) throw new Error(`statement ${name} has a literal parameter ${String(value)}`)
    return value.slice(MARK.length)
  })
  return { name, sql: compiled.sql, params }
}

function bind(statement: Statement, values: Record<string, unknown>): unknown[] {
  return statement.params.map((param) => {
    const value = values[param]
    if (value === undefined) throw new Error(`statement ${statement.name} needs ${param}`)
    return value
  })
}

/**
 * better-sqlite3 on the one connection Kysely also uses. Kysely's own statements there are single
 * statements that run to completion synchronously, and every transaction of the store is a plan
 * run here in one synchronous call, so statements of two transactions never interleave.
 */
export class SqliteRunner implements Runner {
  readonly #prepared = new Map<string, Sqlite.Statement>()

  constructor(private readonly database: Sqlite.Database) {}

  #statement(statement: Statement): Sqlite.Statement {
    let prepared = this.#prepared.get(statement.name)
    if (!prepared) {
      prepared = this.database.prepare(statement.sql)
      this.#prepared.set(statement.name, prepared)
    }
    return prepared
  }

  #exec(statement: Statement, values: Record<string, unknown>): Row[] {
    const prepared = this.#statement(statement)
    const bound = bind(statement, values)
    if (prepared.reader) return prepared.all(bound) as Row[]
    prepared.run(bound)
    return []
  }

  async run(statement: Statement, values: Record<string, unknown>): Promise<Row[]> {
    return this.#exec(statement, values)
  }

  async transaction<T>(plan: () => Plan<T>): Promise<T> {
    // A transaction already open here would mean one spans an await somewhere: joining it would
    // tie these writes to a commit this code does not control.
    if (this.database.inTransaction) throw new Error('SQLite transaction already open on the store connection')
    const drive = this.database.transaction(() => {
      const steps = plan()
      for (let next = steps.next([]); ; ) {
        if (next.done) return next.value
        next = steps.next(this.#exec(next.value.statement, next.value.values))
      }
    })
    // IMMEDIATE takes the write lock up front: another process's writer makes this wait
    // (busy_timeout) rather than fail halfway with SQLITE_BUSY on the first write.
    return drive.immediate()
  }
}

/** node-postgres: named prepared statements, a transaction on one client of the pool. */
export class PostgresRunner implements Runner {
  constructor(private readonly pool: pg.Pool) {}

  async run(statement: Statement, values: Record<string, unknown>): Promise<Row[]> {
    const result = await this.pool.query<Row>({ name: statement.name, text: statement.sql, values: bind(statement, values) })
    return result.rows
  }

  async transaction<T>(plan: () => Plan<T>): Promise<T> {
    const client = await this.pool.connect()
    let broken: Error | undefined
    try {
      await client.query('BEGIN')
      try {
        const steps = plan()
        let next = steps.next([])
        while (!next.done) {
          const { statement, values } = next.value
          const result = await client.query<Row>({ name: statement.name, text: statement.sql, values: bind(statement, values) })
          next = steps.next(result.rows)
        }
        await client.query('COMMIT')
        return next.value
      } catch (err) {
        await client.query('ROLLBACK').catch((rollbackError: Error) => {
          // a connection that cannot roll back is not handed to the next caller
          broken = rollbackError
        })
        throw err
      }
    } finally {
      client.release(broken)
    }
  }
}
