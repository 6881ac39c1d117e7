import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import type {} from '@fastify/websocket'
import type { FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import { principal } from '../plugins/auth.js'
import { envelope, toApiError } from '../plugins/errors.js'
import { CLOSE, TOO_SLOW_REASON } from '../plugins/websocket.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import type { Principal } from '../services/auth.js'
import type { EventRecord } from '../services/store/types.js'

const Event = Type.Object({ id: Type.Integer(), type: Type.String(), created_at: Type.String(), data: Type.Unknown() })
const view = (e: EventRecord) => ({ id: e.id, type: e.type, created_at: e.createdAt, data: e.data })

const AUTH_TIMEOUT_MS = 10_000
const REPLAY_PAGE = 100
/** Past this many unsent bytes the subscriber is dropped; it resumes with latest_event_id. */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024
/** The replay waits for the client to read once this much is unsent. */
const REPLAY_HIGH_WATER = 1024 * 1024

/** The event log over REST (protected scope). */
export const eventLog: FastifyPluginAsyncTypebox = async (app) => {
  app.get(
    '/v1/sessions/:id/events',
    {
      schema: {
        operationId: 'listEvents',
        tags: ['events'],
        summary: 'Search the session event log',
        params: SessionIdParams,
        querystring: Type.Object({
          start_id: Type.Optional(Type.Integer({ minimum: 0 })),
          end_id: Type.Optional(Type.Integer({ minimum: 0, description: 'inclusive' })),
          reverse: Type.Boolean({ default: false }),
          limit: Type.Integer({ minimum: 1, maximum: 100, default: 20 }),
        }),
        response: { 200: Type.Object({ events: Type.Array(Event), has_more: Type.Boolean() }, { description: 'A page of events' }), ...protectedErrors(400, 404) },
      },
    },
    async (request) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      const q = request.query
      const page = await app.store.listEvents(session.id, { startId: q.start_id, endId: q.end_id, reverse: q.reverse, limit: q.limit })
      return { events: page.events.map(view), has_more: page.hasMore }
    },
  )
}

type ClientFrame =
  | { type: 'auth'; token: string }
  | { type: 'message'; content: string }
  | { type: 'stop' }
  | { type: 'confirm'; approve: boolean }

function parseFrame(data: unknown): ClientFrame | undefined {
  try {
    const frame = JSON.parse(String(data))
    if (frame?.type === 'auth' && typeof frame.token === 'string') return frame
    if (frame?.type === 'message' && typeof frame.content === 'string' && frame.content.length > 0) return frame
    if (frame?.type === 'stop') return frame
    if (frame?.type === 'confirm' && typeof frame.approve === 'boolean') return frame
  } catch {
    // not JSON: answered below as an invalid frame
  }
  return undefined
}

/**
 * The live socket. It sits outside the bearer-auth scope because browsers cannot set headers on
 * a WebSocket: the key comes in the Authorization header or in a first `auth` frame (never in
 * the query string, which ends up in logs).
 */
export const eventSocket: FastifyPluginAsyncTypebox = async (app) => {
  app.get(
    '/v1/sessions/:id/events/ws',
    {
      websocket: true,
      schema: {
        operationId: 'connectEvents',
        tags: ['events'],
        summary: 'Live events over WebSocket, with replay after latest_event_id',
        description:
          'Authenticate with the Authorization header or a first frame {"type":"auth","token"}. Client frames: message, stop, confirm. Close codes: 4001 unauthorized, 4004 session not found, 4008 too slow (resume with latest_event_id).',
        params: SessionIdParams,
        querystring: Type.Object({ latest_event_id: Type.Integer({ minimum: 0, default: 0 }) }),
      },
    },
    (socket: WebSocket, request: FastifyRequest<{ Params: { id: string }; Querystring: { latest_event_id: number } }>) => {
      const pending: unknown[] = []
      let token = ''
      let handling = Promise.resolve()
      // Set once a key is being checked: frames that follow it wait for the outcome instead of
      // being taken for a missing auth frame (or dropped when the key came in the header).
      let authenticating = false
      // The canonical id from the store: the path may spell the UUID in another case, and the
      // bus, the run registry and the kernels key on the stored id.
      let sessionId: string | undefined
      let unsubscribe: (() => void) | undefined
      let unwatchKey: (() => void) | undefined
      let ready = false
      let live: { id: number; frame: string }[] | undefined
      // Nothing more is queued for a socket being dropped: the subscription and the events held
      // back during the replay go at once, and the heartbeat (plugins/websocket.ts) terminates
      // the socket if its close frame cannot get through the unread data ahead of it.
      const tooSlow = () => {
        unsubscribe?.()
        live = undefined
        socket.close(CLOSE.tooSlow, TOO_SLOW_REASON)
      }
      const send = (frame: unknown) => {
        if (socket.readyState !== socket.OPEN) return
        const text = JSON.stringify(frame)
        if (socket.bufferedAmount + Buffer.byteLength(text) > MAX_BUFFERED_BYTES) return tooSlow()
        socket.send(text)
      }
      /**
       * Replay sends at the client's pace: it can be far larger than the buffer, and a client
       * that reads is not too slow just because the backlog is long. Waiting here holds back
       * only this socket, never the run.
       */
      const paced = (frame: string) =>
        new Promise<void>((resolve) => {
          if (socket.readyState !== socket.OPEN) return resolve()
          if (socket.bufferedAmount < REPLAY_HIGH_WATER) {
            socket.send(frame)
            return resolve()
          }
          const done = () => {
            socket.off('close', done)
            resolve()
          }
          socket.once('close', done)
          socket.send(frame, done)
        })
      const eventFrame = (event: EventRecord) => JSON.stringify({ type: 'event', event: view(event) })
      const fail = (err: unknown) => send({ type: 'error', ...envelope(toApiError(err as Error)) })

      const start = async (who: Principal) => {
        const session = await app.store.getSession(who.tenantId, request.params.id)
        if (!session) return socket.close(CLOSE.notFound, 'session not found')
        // gone while the key or the session was looked up: a subscription now would never end
        if (socket.readyState !== socket.OPEN) return
        sessionId = session.id
        // Subscribe before reading the log: live events that arrive during the replay wait in
        // `live` (bounded like the socket buffer) and are sent after it, skipping any the
        // replay already covered.
        let last = request.query.latest_event_id
        live = []
        let liveBytes = 0
        let replaying = true
        unsubscribe = app.bus.subscribe(session.id, (event) => {
          if (replaying) {
            if (!live) return
            const frame = eventFrame(event)
            live.push({ id: event.id, frame })
            liveBytes += frame.length
            if (liveBytes > MAX_BUFFERED_BYTES) tooSlow()
          } else if (event.id > last) {
            last = event.id
            send({ type: 'event', event: view(event) })
          }
        })
        // With replicas, events appended elsewhere from now on reach the subscription.
        await app.bus.ready(session.id)
        for (;;) {
          const page = await app.store.listEvents(session.id, { startId: last + 1, limit: REPLAY_PAGE })
          for (const event of page.events) {
            if (socket.readyState !== socket.OPEN) return
            last = event.id
            await paced(eventFrame(event))
          }
          if (!page.hasMore) break
        }
        // an index loop: events keep arriving in `live` while this waits for the client
        for (let i = 0; live && i < live.length; i++) {
          const event = live[i]!
          liveBytes -= event.frame.length
          if (event.id <= last) continue
          if (socket.readyState !== socket.OPEN) return
          last = event.id
          await paced(event.frame)
        }
        live = undefined
        replaying = false
        if (socket.readyState !== socket.OPEN) return
        ready = true
        send({ type: 'ready', latest_event_id: last })
        for (const frame of pending.splice(0)) enqueue(frame)
      }

      const handle = async (raw: unknown) => {
        const frame = parseFrame(raw)
        if (!frame) return send({ type: 'error', error: { message: 'Invalid frame', type: 'validation_error', code: 'invalid_message', param: null } })
        if (frame.type === 'auth') return
        // Checked again on every frame, as on every HTTP request (the watch below closes the
        // socket at once; this covers a revocation on a replica it never heard from).
        const who = await app.keys.resolve(token)
        if (!who) return socket.close(CLOSE.unauthorized, 'API key revoked or expired')
        const id = sessionId!
        // The socket stays here (events arrive through the log); what acts on the session goes to its owner.
        const owner = await app.cluster?.ownerOf(id)
        if (owner) return void toOwner(owner, id, frame).catch(fail)
        try {
          if (frame.type === 'stop') app.runs.stop(id)
          else if (frame.type === 'confirm') app.chat.confirm({ tenantId: who.tenantId, sessionId: id, approve: frame.approve }).catch(fail)
          else
            app.chat
              .run({ tenantId: who.tenantId, sessionId: id, inputs: [{ role: 'user', type: 'message', content: frame.content }] })
              .catch(fail)
        } catch (err) {
          fail(err)
        }
      }

      /** A frame for a session another replica owns, as the HTTP call it stands for. */
      const toOwner = async (owner: string, id: string, frame: Exclude<ClientFrame, { type: 'auth' }>) => {
        const call = (path: string, body: unknown) =>
          fetch(`${owner}${path}`, {
            method: 'POST',
            headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', ...app.cluster!.callHeaders() },
            body: JSON.stringify(body),
          })
        const response =
          frame.type === 'stop'
            ? await call(`/v1/sessions/${id}/stop`, {})
            : frame.type === 'confirm'
              ? await call(`/v1/sessions/${id}/confirm`, { approve: frame.approve })
              : await call('/v1/chat', { session_id: id, stream: true, messages: [{ role: 'user', type: 'message', content: frame.content }] })
        const text = await response.text()
        // the owner's error envelope, passed on as the error frame it would have been here
        if (!response.ok) return send({ type: 'error', ...(JSON.parse(text) as { error: unknown }) })
        // A run that failed after its stream began reports it as its last SSE event.
        const failed = /^event: error\ndata: (.*)$/m.exec(text)
        if (failed) send({ type: 'error', ...JSON.parse(failed[1]!) })
      }

      // Frames are chained: each checks the key first, and they must still act in their order.
      const enqueue = (data: unknown) => {
        handling = handling.then(() => handle(data)).catch(fail)
      }

      // The key is watched for as long as the socket is open: revoking it or its expiry closes
      // the socket at once, not only at its next frame.
      const keyEnded = () => socket.close(CLOSE.unauthorized, 'API key revoked or expired')
      const authenticate = (key: string) => {
        authenticating = true
        token = key
        void app.keys
          .watch(key, keyEnded)
          .then((watched) => {
            if (!watched) return socket.close(CLOSE.unauthorized, 'invalid API key')
            if (socket.readyState !== socket.OPEN) return watched.stop()
            unwatchKey = watched.stop
            return start(watched.principal)
          })
          .catch(fail)
      }

      socket.on('close', () => {
        clearTimeout(timer)
        unsubscribe?.()
        unwatchKey?.()
      })
      socket.on('message', (data) => {
        if (ready) return enqueue(data)
        if (authenticating) return void pending.push(data)
        clearTimeout(timer)
        const frame = parseFrame(data)
        if (frame?.type !== 'auth') return socket.close(CLOSE.unauthorized, 'authenticate first')
        authenticate(frame.token)
      })

      const timer = setTimeout(() => {
        if (!authenticating) socket.close(CLOSE.unauthorized, 'authentication timed out')
      }, AUTH_TIMEOUT_MS)
      const header = request.headers.authorization
      if (header) {
        clearTimeout(timer)
        authenticate(/^Bearer (.+)$/.exec(header)?.[1]?.trim() ?? '')
      }
    },
  )
}
