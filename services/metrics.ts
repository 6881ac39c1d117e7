import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

/** Every Prometheus series the server exposes, on a registry of its own (one per app instance). */
export function createMetrics() {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry, prefix: 'oi_' })
  return {
    registry,
    httpRequests: new Counter({
      name: 'oi_http_requests_total',
      help: 'HTTP requests by method, route and status',
      labelNames: ['method', 'route', 'status'] as const,
      registers: [registry],
    }),
    httpDuration: new Histogram({
      name: 'oi_http_request_duration_seconds',
      help: 'HTTP request duration by method, route and status',
      labelNames: ['method', 'route', 'status'] as const,
      buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30],
      registers: [registry],
    }),
    connectionsRefused: new Counter({
      name: 'oi_http_connections_refused_total',
      help: 'Connections closed on accept because their client address had MAX_CONNECTIONS_PER_IP open',
      registers: [registry],
    }),
    runs: new Counter({
      name: 'oi_agent_runs_total',
      help: 'Agent runs by outcome',
      labelNames: ['outcome'] as const,
      registers: [registry],
    }),
    executions: new Counter({
      name: 'oi_executions_total',
      help: 'Code executions by language and outcome',
      labelNames: ['language', 'outcome'] as const,
      registers: [registry],
    }),
    executionDuration: new Histogram({
      name: 'oi_execution_duration_seconds',
      help: 'Code execution duration by language',
      labelNames: ['language'] as const,
      buckets: [0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120],
      registers: [registry],
    }),
    liveKernels: new Gauge({ name: 'oi_kernels_live', help: 'Live kernel processes', registers: [registry] }),
    upstreamTokens: new Counter({
      name: 'oi_upstream_tokens_total',
      help: 'Tokens reported by the upstream model, by kind',
      labelNames: ['kind'] as const,
      registers: [registry],
    }),
  }
}

export type Metrics = ReturnType<typeof createMetrics>
