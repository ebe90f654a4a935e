#!/usr/bin/env node
// s3rver with S3 conditional writes (PUT with If-None-Match: * / If-Match: <etag>).
//
// Why: tansu's S3 storage keeps each partition's high watermark in watermark.json and updates it
// with conditional PUTs (optimistic concurrency). s3rver 3.7.1 ignores those headers, so after a
// broker restart tansu's first watermark write (If-None-Match: *, from an empty cache) silently
// overwrites the stored one instead of failing with 412 and re-reading it: offsets restart at 0
// and new records overwrite old ones (measured: 1,000 records, restart, 1,000 more -> 1,555 of
// 2,000 lost). Real S3 (and MinIO) answer 412 here. This wrapper adds the check in front of
// s3rver's own routes; conditional PUTs of a key are serialized (below).
//
// It also makes object writes atomic. s3rver 3.7.1's FilesystemStore.putObject opens the object
// file in place (truncating it) and answers before the bytes are flushed, so a GET racing a PUT can
// read a truncated object, and a PUT the client abandons midway leaves the object cut short for good
// (tests/integration/test_embedded_store_writes.py shows it). Seen in the chaos suite under heavy
// load: a partition's watermark.json was 0 bytes (its metadata intact), every fetch of that
// partition failed ("EOF while parsing a value") and the sink landed nothing. Here a PUT writes a
// temporary file, waits for it, and renames it over the object (atomic on POSIX): an object is always a whole earlier
// version or a whole new one. Requests on one key take turns, so a conditional PUT's check and
// write are one step (S3's optimistic concurrency) and a read sees one version's bytes and metadata.
// s3rver is unmaintained (https://github.com/jamhall/s3rver, last release 3.7.1): drop this file
// together with s3rver.
//
// Usage: node s3rver_conditional.js <s3rver package dir> <data dir> <port>
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const fsp = require('fs/promises');
const path = require('path');
const { Transform } = require('stream');
const { pipeline } = require('stream/promises');
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

let tmpSeq = 0;
app.store.putObject = async function putObjectAtomically(object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fsp.mkdir(path.dirname(objectPath), { recursive: true });
  const tmp = `${objectPath}.partial-${process.pid}-${++tmpSeq}`; // never listed: not an ._S3rver_object
  const md5 = crypto.createHash('md5');
  let size = 0;
  try {
    if (Buffer.isBuffer(object.content)) {
      md5.update(object.content);
      size = object.content.length;
      await fsp.writeFile(tmp, object.content);
    } else {
      const count = new Transform({
        transform(chunk, encoding, callback) {
          md5.update(chunk, encoding);
          size += chunk.length;
          callback(null, chunk);
        },
      });
      await pipeline(object.content, count, fs.createWriteStream(tmp));
    }
    await fsp.rename(tmp, objectPath);
  } catch (err) {
    await fsp.rm(tmp, { force: true });
    throw err;
  }
  const digest = md5.digest('hex');
  await this.putMetadata(object.bucket, object.key, object.metadata, digest);
  return { size, md5: digest };
};

// Requests on one key, one at a time: a conditional PUT's check and the write it guards are one step.
const keyTails = new Map();
async function oneAtATime(key, fn) {
  const before = keyTails.get(key) || Promise.resolve();
  let release;
  const mine = new Promise(resolve => (release = resolve));
  const tail = before.then(() => mine);
  keyTails.set(key, tail);
  await before;
  try {
    return await fn();
  } finally {
    release();
    if (keyTails.get(key) === tail) keyTails.delete(key);
  }
}

function unquote(etag) {
  return (etag || '').replace(/^W\//, '').replace(/"/g, '');
}

app.middleware.unshift(async (ctx, next) => {
  const noneMatch = ctx.get('if-none-match');
  const match = ctx.get('if-match');
  const parts = ctx.path.split('/').filter(Boolean);
  if (parts.length < 2 || !['PUT', 'GET', 'HEAD', 'DELETE'].includes(ctx.method)) return next();
  const bucket = decodeURIComponent(parts[0]);
  const key = parts.slice(1).map(decodeURIComponent).join('/');
  // An object is its file plus its metadata (length, etag), written one after the other: requests
  // on one key take turns, so a read never pairs one version's metadata with another's bytes (a GET
  // opens its file inside its turn; the open file keeps that version even if renamed over later).
  if (ctx.method === 'PUT' && (noneMatch || match)) {
    return oneAtATime(`${bucket}/${key}`, () => conditionalPut(ctx, next, bucket, key, noneMatch, match));
  }
  return oneAtATime(`${bucket}/${key}`, next);
});

async function conditionalPut(ctx, next, bucket, key, noneMatch, match) {
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
    return undefined;
  }
  return next();
}

app.run().then(({ address, port: p }) => console.log('s3rver (conditional writes) listening on %s:%d', address, p));
