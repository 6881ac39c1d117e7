import { existsSync } from 'node:fs'
import { join } from 'node:path'
import type { Browser, Page } from 'playwright-core'
import t from 'tap'
import { ADMIN_KEY, build } from './helpers/build.js'

const CHROMIUM = '/usr/bin/chromium'
const TIMEOUT = 30_000

// Only Debian's chromium is usable here (no browser downloads); CI installs it.
const skip = existsSync(CHROMIUM) ? false : `${CHROMIUM} not found (apt-get install chromium; .ci/run does)`

t.test('Swagger UI: authorize with a bearer key, try a protected route, see 200', { skip, timeout: 120_000 }, async (t) => {
  const app = await build(t)
  const address = await app.listen({ port: 0, host: '127.0.0.1' })

  const { chromium } = await import('playwright-core')
  const browser: Browser = await chromium.launch({
    executablePath: CHROMIUM,
    timeout: TIMEOUT,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
  let page: Page | undefined
  let failed = false
  try {
    page = await browser.newPage()
    page.setDefaultTimeout(TIMEOUT)
    await page.goto(`${address}/docs/`, { waitUntil: 'domcontentloaded' })
    await page.waitForSelector('.swagger-ui .information-container .title')
    t.match(await page.textContent('.information-container .title'), /oi-server/, 'the document rendered')

    await page.click('button.btn.authorize')
    const keyInput = page.locator('.modal-ux .auth-container input').first()
    await keyInput.fill(ADMIN_KEY)
    await page.click('.modal-ux .auth-btn-wrapper button.authorize')
    // once applied, Swagger UI swaps "Authorize" for "Logout" and masks the value
    await page.waitForSelector('.modal-ux .auth-btn-wrapper button[aria-label="Remove authorization"]')
    await page.click('.modal-ux button.btn-done')
    await page.waitForSelector('.modal-ux', { state: 'detached' })

    const operation = page.locator('.opblock-get').filter({ has: page.locator('.opblock-summary-path[data-path="/metrics"]') })
    await operation.locator('.opblock-summary').first().click()
    // tryItOutEnabled opens operations in "Try it out" mode already; the button then reads "Cancel"
    const tryOut = operation.locator('button.try-out__btn')
    if ((await tryOut.textContent())?.trim() === 'Try it out') await tryOut.click()
    await operation.locator('button.execute').click()

    const status = operation.locator('.live-responses-table .response .response-col_status').first()
    await status.waitFor()
    t.equal((await status.textContent())?.trim(), '200', 'the rendered response shows 200')
    const body = await operation.locator('.live-responses-table .response .response-col_description').first().textContent()
    t.match(body, /oi_http_requests_total/, 'the metrics body is shown')
    const curl = await operation.locator('.curl-command').first().textContent()
    t.match(curl, /Authorization: Bearer/, 'the request carried the bearer key')
  } catch (err) {
    failed = true
    throw err
  } finally {
    if (page && (failed || !t.passing())) {
      // kept after the test (the fixture dir is otherwise removed at its end)
      t.saveFixture = true
      const file = join(t.testdir({}), 'docs-failure.png')
      await page.screenshot({ path: file, fullPage: true }).catch(() => {})
      t.comment(`screenshot saved to ${file}`)
    }
    await browser.close()
  }
})
