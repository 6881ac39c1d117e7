import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import type { Config } from '../config.js'
import { ChatService } from '../services/chat.js'
import { loadSecretsKey, SecretBox } from '../services/crypto.js'
import { EventBus } from '../services/events.js'
import { ExecutionService } from '../services/execution.js'
import { ResponsesService } from '../services/responses.js'
import { RunRegistry } from '../services/runs.js'
import { SecretsService } from '../services/secrets.js'
import { SettingsService } from '../services/settings.js'

declare module 'fastify' {
  interface FastifyInstance {
    bus: EventBus
    runs: RunRegistry
    settings: SettingsService
    secrets: SecretsService
    execution: ExecutionService
    chat: ChatService
    responses: ResponsesService
  }
}

/** The agent and what it stands on: event log, runs, tenant settings and secrets, executions; the Responses API over it. */
export default fp(
  async function agent(app: FastifyInstance, { config }: { config: Config }) {
    const cluster = app.cluster
    const bus = new EventBus(app.store, cluster ? { relay: cluster.relay, fence: (id) => cluster.fence(id) } : {})
    const runs = new RunRegistry()
    const settings = new SettingsService(app.store, {
      model: config.LITELLM_MODEL,
      temperature: config.TEMPERATURE,
      maxTokens: config.MAX_TOKENS,
      maxIterations: config.MAX_ITERATIONS,
    })
    const secrets = new SecretsService(app.store, new SecretBox(loadSecretsKey(config.SECRETS_KEY, join(config.DATA_DIR, 'secrets.key'))))
    const execution = new ExecutionService(cluster ? cluster.runner(app.kernels) : app.kernels, bus, secrets, app.metrics)
    app.kernels.onBackgroundOutput = (background) => {
      execution.recordBackground(background).catch((err: unknown) => app.log.warn({ err, sessionId: background.sessionId }, 'background kernel output not recorded'))
    }
    const languages = async () => (await app.kernels.languages()).filter((l) => l.available).map((l) => l.name)
    const chat = new ChatService({
      store: app.store,
      bus,
      runs,
      settings,
      secrets,
      execution,
      metrics: app.metrics,
      client: () => app.llm.require(),
      languages,
      tools: config.LLM_TOOLS,
      maxOutputChars: config.MODEL_OUTPUT_LIMIT_CHARS,
    })
    app.decorate('bus', bus)
    app.decorate('runs', runs)
    app.decorate('settings', settings)
    app.decorate('secrets', secrets)
    app.decorate('execution', execution)
    app.decorate('chat', chat)
    const responses = new ResponsesService({ store: app.store, chat, sessions: app.sessions, settings, runs })
    app.decorate('responses', responses)
    // running turns end (and their streams close) before the kernels and the store go away
    app.addHook('preClose', async () => {
      runs.stopAll()
      // A response no client waits on (background) is stored as it ended while the store is still open.
      await responses.settled()
    })
  },
  { name: 'agent', dependencies: ['store', 'sessions', 'kernels', 'llm', 'metrics', 'cluster'] },
)
