import { createHmac, timingSafeEqual } from 'node:crypto'

/** Names the forwarding replica and how many replicas the request has passed: `<replica id> <hops>`. */
export const REPLICA_HEADER = 'x-oi-replica'
/** Proves the forwarding replica knows REPLICA_SECRET (never sent by clients: they talk to the load balancer). */
export const REPLICA_AUTH_HEADER = 'x-oi-replica-auth'

/** Who forwarded a request, once its proof checked out. */
export interface Forwarder {
  replicaId: string
  hops: number
}

/**
 * Replica-to-replica authentication with the shared REPLICA_SECRET. The proof is an HMAC of the
 * forwarder's id and hop count under the secret, compared in constant time: a client that sets
 * these headers itself cannot pass for a replica (which would skip its per-IP limit, or make a
 * replica serve a session it does not own). The client's own `Authorization` travels unchanged
 * and is checked by the replica that serves the request, as for any request.
 */
export class ReplicaAuth {
  readonly #secret: string

  constructor(secret: string) {
    this.#secret = secret
  }

  /** The headers a forwarded request carries. */
  headers(replicaId: string, hops: number): Record<string, string> {
    const claim = `${replicaId} ${hops}`
    return { [REPLICA_HEADER]: claim, [REPLICA_AUTH_HEADER]: this.#proof(claim) }
  }

  /** The forwarder, when the request carries a valid proof; undefined otherwise. */
  verify(headers: Record<string, string | string[] | undefined>): Forwarder | undefined {
    const claim = headers[REPLICA_HEADER]
    const proof = headers[REPLICA_AUTH_HEADER]
    if (typeof claim !== 'string' || typeof proof !== 'string') return undefined
    const expected = Buffer.from(this.#proof(claim))
    const given = Buffer.from(proof)
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) return undefined
    const match = /^(\S{1,100}) (\d{1,2})$/.exec(claim)
    return match ? { replicaId: match[1]!, hops: Number(match[2]) } : undefined
  }

  #proof(claim: string): string {
    return createHmac('sha256', this.#secret).update(`oi-server replica\n${claim}`).digest('base64url')
  }
}
