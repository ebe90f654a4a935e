#!/usr/bin/env node
// s3rver with S3 conditional writes (PUT with If-None-Match: * / If-Match: <etag>).
//
// Why: tansu's S3 storage keeps each partition's high watermark in watermark.json and updates it
// with conditional PUTs (optimistic concurrency). s3rver 3.7.1 ignores those headers, so after a
// broker restart tansu's first watermark write (If-None-Match: *, from an empty cache) silently
// overwrites the stored one instead of failing with 412 and re-reading it: offsets restart at 0
// and new records overwrite old ones (measured: 1,000 records, restart, 1,000 more -> 1,555 of
// 2,000 lost). Real S3 (and MinIO) answer 412 here. This wrapper adds the check in front of
// s3rver's own routes; one broker writes to it, so check-then-write needs no lock.
//
// Usage: node s3rver_conditional.js <s3rver package dir> <data dir> <port>
'use strict';
const path = require('path');
const [, , pkgDir, directory, port] = process.argv;
const S3rver = require(path.join(pkgDir, 'lib', 's3rver.js'));

const app = new S3rver({
  directory,
  address: '127.0.0.1',
  port: Number(port),
  silent: true,
  vhostBuckets: false,
  configureBuckets: [{ name: 'tansu', configs: [] }],
});

function unquote(etag) {
  return (etag || '').replace(/^W\//, '').replace(/"/g, '');
}

app.middleware.unshift(async (ctx, next) => {
  const noneMatch = ctx.get('if-none-match');
  const match = ctx.get('if-match');
  if (ctx.method === 'PUT' && (noneMatch || match)) {
    const parts = ctx.path.split('/').filter(Boolean);
    const bucket = decodeURIComponent(parts[0] || '');
    const key = parts.slice(1).map(decodeURIComponent).join('/');
    let metadata = null;
    try {
      metadata = await app.store.getMetadata(bucket, key);
    } catch (err) {
      if (err.code !== 'ENOENT') throw err;
    }
    const failed =
      (noneMatch === '*' && metadata) ||
      (match && (!metadata || (match !== '*' && unquote(match) !== unquote(metadata.etag))));
    if (failed) {
      ctx.status = 412;
      ctx.type = 'application/xml';
      ctx.body =
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PreconditionFailed</Code>' +
        '<Message>At least one of the pre-conditions you specified did not hold</Message></Error>';
      return;
    }
  }
  return next();
});

app.run().then(({ address, port: p }) => console.log('s3rver (conditional writes) listening on %s:%d', address, p));
