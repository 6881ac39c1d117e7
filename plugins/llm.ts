import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { Llm, type LlmOptions } from '../services/llm.js'

declare module 'fastify' {
  interface FastifyInstance {
    llm: Llm
  }
}

/** The one upstream client (the `openai` package) pointed at LLM_BASE_URL. */
export default fp(
  async function llm(app: FastifyInstance, opts: LlmOptions) {
    const llm = new Llm(opts)
    app.decorate('llm', llm)
    app.addHook('onClose', async () => llm.close())
  },
  { name: 'llm' },
)
