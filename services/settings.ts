import type { RunConfig, Settings, SettingsPatch } from '../schemas/settings.js'
import type { Store } from './store/types.js'

export interface ServerDefaults {
  model: string
  temperature: number
  maxTokens: number
  maxIterations: number
}

/**
 * Per-tenant settings over the server's defaults. Precedence for a run: the request's `config`,
 * then the tenant's settings, then the environment.
 */
export class SettingsService {
  constructor(
    private readonly store: Store,
    private readonly defaults: ServerDefaults,
  ) {}

  private base(): Settings {
    return {
      model: this.defaults.model,
      temperature: this.defaults.temperature,
      max_tokens: this.defaults.maxTokens,
      auto_run: true,
      system_message: '',
      custom_instructions: '',
      max_iterations: this.defaults.maxIterations,
    }
  }

  async get(tenantId: string): Promise<Settings> {
    return { ...this.base(), ...((await this.store.getSettings(tenantId)) as Partial<Settings>) }
  }

  async patch(tenantId: string, patch: SettingsPatch): Promise<Settings> {
    const stored = (await this.store.getSettings(tenantId)) as Record<string, unknown>
    for (const [key, value] of Object.entries(patch)) {
      if (value === null) delete stored[key]
      else if (value !== undefined) stored[key] = value
    }
    await this.store.putSettings(tenantId, stored)
    return { ...this.base(), ...(stored as Partial<Settings>) }
  }

  /** The settings one run uses. */
  async effective(tenantId: string, config: RunConfig = {}): Promise<Settings> {
    const tenant = await this.get(tenantId)
    return {
      model: config.llm?.model ?? tenant.model,
      temperature: config.llm?.temperature ?? tenant.temperature,
      max_tokens: config.llm?.max_tokens ?? tenant.max_tokens,
      auto_run: config.auto_run ?? tenant.auto_run,
      system_message: config.system_message ?? tenant.system_message,
      custom_instructions: config.custom_instructions ?? tenant.custom_instructions,
      max_iterations: config.max_iterations ?? tenant.max_iterations,
    }
  }
}
