//! Compressed request bodies (`Content-Encoding: gzip | deflate | br | zstd`, in any
//! order): decoded to be scanned; the compressed bytes are what is forwarded. A body
//! that does not decode, or decodes to more than the limit, is refused: it would
//! otherwise pass unscanned.

use std::io::Read;

/// A coding latchkey can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

/// The codings of a body, outermost last as `Content-Encoding` lists them; `Err` names
/// one latchkey cannot undo.
pub fn codings(headers: &http::HeaderMap) -> Result<Vec<Coding>, String> {
    let mut out = Vec::new();
    for v in headers.get_all(http::header::CONTENT_ENCODING) {
        for c in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|c| !c.is_empty()) {
            let coding = match c.to_ascii_lowercase().as_slice() {
                b"identity" => continue,
                b"gzip" | b"x-gzip" => Coding::Gzip,
                b"deflate" => Coding::Deflate,
                b"br" => Coding::Brotli,
                b"zstd" => Coding::Zstd,
                _ => return Err(String::from_utf8_lossy(c).into_owned()),
            };
            out.push(coding);
        }
    }
    Ok(out)
}

/// Undo `codings` (the last applied first); at most `limit` bytes of output.
pub fn decode(body: &[u8], codings: &[Coding], limit: usize) -> Result<Vec<u8>, String> {
    let mut data = body.to_vec();
    for c in codings.iter().rev() {
        data = decode_one(&data, *c, limit)?;
    }
    Ok(data)
}

fn decode_one(body: &[u8], coding: Coding, limit: usize) -> Result<Vec<u8>, String> {
    let reader: Box<dyn Read + '_> = match coding {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(body)),
        Coding::Brotli => Box::new(brotli_decompressor::Decompressor::new(body, 4096)),
        Coding::Zstd => {
            Box::new(ruzstd::decoding::StreamingDecoder::new(body).map_err(|e| format!("zstd: {e}"))?)
        }
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{coding:?} body does not decode: {e}"))?;
    if out.len() > limit {
        return Err(format!("{coding:?} body decodes to more than {limit} bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_and_deflate_round_trip_and_garbage_is_an_error() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"hello secret").unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode(&gz, &[Coding::Gzip], 100).unwrap(), b"hello secret");
        assert!(decode(&gz, &[Coding::Gzip], 5).is_err(), "over the limit");
        assert!(decode(b"not gzip at all", &[Coding::Gzip], 100).is_err());
        assert!(decode(b"not zstd at all", &[Coding::Zstd], 100).is_err());
        assert!(decode(b"\xff\xff\xff\xff not br", &[Coding::Brotli], 100).is_err());
    }

    fn dotenv() -> String {
        let (id, secret) = (crate::dlp::tests::AWS_ID, crate::dlp::tests::AWS_SECRET);
        format!(
            "DATABASE_URL=postgres://localhost/app\nAWS_ACCESS_KEY_ID={id}\nAWS_SECRET_ACCESS_KEY={secret}\n"
        )
    }

    fn scanned(plain: &[u8]) -> Vec<String> {
        let s = crate::dlp::Scanner::new(true, vec![]).unwrap();
        s.scan(plain, None).hits.iter().map(|h| s.ids[h.rule].to_string()).collect()
    }

    /// A body brotli-compressed by Google's encoder (the fixture's README says how it was
    /// made) decodes whole, and the AWS key pair inside is found.
    #[test]
    fn a_brotli_body_decodes_and_its_secret_is_found() {
        let br = include_bytes!("../../tests/data/dlp-compressed/dotenv.br");
        let plain = decode(br, &[Coding::Brotli], 1000).unwrap();
        assert_eq!(plain, dotenv().as_bytes());
        assert_eq!(scanned(&plain), ["aws-access-key"]);
        assert!(decode(br, &[Coding::Brotli], 50).is_err(), "over the limit");
    }

    /// A zstd body (and zstd inside gzip: codings are undone last first) decodes whole,
    /// and the AWS key pair inside is found.
    #[test]
    fn a_zstd_body_decodes_and_its_secret_is_found() {
        let level = ruzstd::encoding::CompressionLevel::Fastest;
        let zst = ruzstd::encoding::compress_to_vec(dotenv().as_bytes(), level);
        let plain = decode(&zst, &[Coding::Zstd], 1000).unwrap();
        assert_eq!(plain, dotenv().as_bytes());
        assert_eq!(scanned(&plain), ["aws-access-key"]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&zst).unwrap();
        let both = decode(&gz.finish().unwrap(), &[Coding::Zstd, Coding::Gzip], 1000).unwrap();
        assert_eq!(scanned(&both), ["aws-access-key"]);
        assert!(decode(&zst, &[Coding::Zstd], 50).is_err(), "over the limit");
    }

    #[test]
    fn unknown_codings_are_named() {
        let mut h = http::HeaderMap::new();
        h.append("content-encoding", "gzip, br".parse().unwrap());
        assert_eq!(codings(&h).unwrap(), vec![Coding::Gzip, Coding::Brotli]);
        h.append("content-encoding", "compress".parse().unwrap());
        assert_eq!(codings(&h).unwrap_err(), "compress");
    }
}
