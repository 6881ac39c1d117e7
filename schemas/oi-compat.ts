import { Type } from '@sinclair/typebox'
import { LmcInput } from './lmc.js'
import { SettingsFields } from './settings.js'

/**
 * `POST /settings` of the Open Interpreter protocol. Other names are accepted by the schema so
 * the route can answer each with the right status (403 for auto_run, computer and the upstream's
 * URL or key; 400 for unknown ones).
 */
export const OiSettingsBody = Type.Object(
  {
    messages: Type.Optional(Type.Array(LmcInput, { maxItems: 10_000, description: 'Replaces the conversation; [] resets it' })),
    custom_instructions: Type.Optional(SettingsFields.custom_instructions),
    system_message: Type.Optional(SettingsFields.system_message),
    llm: Type.Optional(
      Type.Object(
        {
          model: Type.Optional(SettingsFields.model),
          temperature: Type.Optional(SettingsFields.temperature),
          max_tokens: Type.Optional(SettingsFields.max_tokens),
        },
        { additionalProperties: true },
      ),
    ),
  },
  { additionalProperties: true, examples: [{ messages: [], custom_instructions: 'Answer briefly.', llm: { model: 'gpt-4o-mini' } }] },
)

export const OiStatus = Type.Object({ status: Type.Literal('success') }, { description: 'Applied' })
