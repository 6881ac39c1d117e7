# syntax=docker/dockerfile:1

# ---- build: compile TypeScript and the native better-sqlite3 addon, then drop dev dependencies
FROM node:22-bookworm-slim AS build
WORKDIR /app
# node-gyp needs these when no prebuilt better-sqlite3 binary matches
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npm run build && npm prune --omit=dev

# ---- runtime
FROM node:22-bookworm-slim
# python3/bash/node are the kernels' interpreters; bubblewrap isolates them (SANDBOX=bwrap);
# util-linux provides prlimit/setsid for the kernel limits; tini reaps the kernels' orphans,
# which node as PID 1 would leave as zombies.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-matplotlib python3-numpy python3-seccomp bash bubblewrap util-linux ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Owned by root: the service (and code escaping a kernel) cannot rewrite the application.
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
RUN mkdir -p /data && chown node:node /data
USER node
ENV HOST=0.0.0.0 \
    PORT=5001 \
    DATA_DIR=/data
VOLUME /data
EXPOSE 5001
# Public route, no key needed; over HTTPS when TLS_CERT_FILE is set (certificate not verified:
# this is the container talking to itself over loopback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["node", "-e", "const s=process.env.TLS_CERT_FILE?'https':'http';if(s==='https')process.env.NODE_TLS_REJECT_UNAUTHORIZED='0';fetch(s+'://127.0.0.1:'+(process.env.PORT||5001)+'/v1/health').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["node", "dist/cli.js"]
