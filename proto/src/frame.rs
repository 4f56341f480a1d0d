//! Framing of the guest protocol on a byte stream.
//!
//! A frame is a 4-byte little-endian payload length `N` followed by `N` payload bytes, one
//! prost-encoded message. `N <= MAX_FRAME_LEN`. A reader that sees a larger length skips the
//! payload (so the stream stays in sync) and reports [`FrameError::TooLarge`]; the caller
//! answers with an error and keeps serving.

use std::io::{self, Read, Write};

use prost::Message;

use crate::guest::{Request, Response};

/// Largest payload a frame may carry (1 MiB).
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// The length prefix exceeded the limit; the payload was skipped.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u32 },
    /// The payload is not a valid message.
    #[error("undecodable message")]
    Decode(#[source] prost::DecodeError),
    /// I/O error on the stream.
    #[error("i/o on the stream")]
    Io(#[source] io::Error),
}

/// Encodes `msg` as one frame appended to `out`.
///
/// # Errors
/// [`FrameError::TooLarge`] when the encoded message exceeds [`MAX_FRAME_LEN`].
pub fn encode_frame<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    let len32 = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLarge { len: len as u64, max: MAX_FRAME_LEN })?;
    out.reserve(HEADER_LEN + len);
    out.extend_from_slice(&len32.to_le_bytes());
    msg.encode(out).map_err(|e| FrameError::Io(io::Error::other(e)))?;
    Ok(())
}

/// Writes `msg` as one frame and flushes.
///
/// # Errors
/// Encoding limits or I/O errors.
pub fn write_frame<M: Message, W: Write>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf)?;
    w.write_all(&buf).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Reads exactly `buf.len()` bytes; `Ok(n < len)` means the stream ended after `n` bytes.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one frame's payload (not decoded). Oversized frames are skipped and reported.
///
/// # Errors
/// [`FrameError::Closed`] at a clean end of stream, [`FrameError::Truncated`],
/// [`FrameError::TooLarge`] (the stream is still usable), [`FrameError::Io`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    match read_full(r, &mut hdr)? {
        0 => return Err(FrameError::Closed),
        n if n < HEADER_LEN => return Err(FrameError::Truncated { got: n, want: HEADER_LEN }),
        _ => {}
    }
    let len = u32::from_le_bytes(hdr);
    if len > MAX_FRAME_LEN {
        // Skip the payload so the next frame starts where the peer thinks it does.
        let skipped =
            io::copy(&mut r.take(u64::from(len)), &mut io::sink()).map_err(FrameError::Io)?;
        if skipped < u64::from(len) {
            return Err(FrameError::Truncated {
                got: usize::try_from(skipped).unwrap_or(usize::MAX),
                want: len as usize,
            });
        }
        return Err(FrameError::TooLarge { len: u64::from(len), max: MAX_FRAME_LEN });
    }
    let want = len as usize;
    let mut buf = vec![0u8; want];
    let got = read_full(r, &mut buf)?;
    if got < want {
        return Err(FrameError::Truncated { got, want });
    }
    Ok(buf)
}

/// Decodes a request payload (the guest side's decoder of untrusted input; fuzzed).
///
/// # Errors
/// [`FrameError::Decode`] for invalid protobuf.
pub fn decode_request(payload: &[u8]) -> Result<Request, FrameError> {
    Request::decode(payload).map_err(FrameError::Decode)
}

/// Decodes a response payload (the host side's decoder of guest-controlled input).
///
/// # Errors
/// [`FrameError::Decode`] for invalid protobuf.
pub fn decode_response(payload: &[u8]) -> Result<Response, FrameError> {
    Response::decode(payload).map_err(FrameError::Decode)
}

/// Splits as many complete frames as possible off the front of `buf` (for callers that
/// read into their own buffer, e.g. async ones). Returns the payload ranges and how many
/// bytes were consumed. An oversized length prefix is an error (the caller must close or
/// skip `len` bytes itself).
///
/// # Errors
/// [`FrameError::TooLarge`] when a length prefix exceeds [`MAX_FRAME_LEN`].
pub fn split_frames(buf: &[u8]) -> Result<(Vec<std::ops::Range<usize>>, usize), FrameError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= HEADER_LEN {
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&buf[pos..pos + HEADER_LEN]);
        let len = u32::from_le_bytes(hdr);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge { len: u64::from(len), max: MAX_FRAME_LEN });
        }
        let end = pos + HEADER_LEN + len as usize;
        if end > buf.len() {
            break;
        }
        out.push(pos + HEADER_LEN..end);
        pos = end;
    }
    Ok((out, pos))
}

/// Everything the guest does with one untrusted byte buffer: split it into frames and decode
/// each as a [`Request`]. Used by the fuzz target and its unit test; never panics.
#[must_use]
pub fn decode_stream(bytes: &[u8]) -> Vec<Result<Request, FrameError>> {
    let mut out = Vec::new();
    let mut cur = io::Cursor::new(bytes);
    loop {
        match read_frame(&mut cur) {
            Ok(p) => out.push(decode_request(&p)),
            Err(FrameError::Closed | FrameError::Truncated { .. } | FrameError::Io(_)) => break,
            Err(e) => out.push(Err(e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{request, Hello, Ping};

    fn hello() -> Request {
        Request {
            id: 7,
            body: Some(request::Body::Hello(Hello {
                magic: crate::GUEST_MAGIC,
                version: 1,
                client: "t".into(),
            })),
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode_frame(&hello(), &mut buf).unwrap();
        let p = Request { id: 8, body: Some(request::Body::Ping(Ping {})) };
        encode_frame(&p, &mut buf).unwrap();
        let mut cur = io::Cursor::new(&buf);
        assert_eq!(decode_request(&read_frame(&mut cur).unwrap()).unwrap(), hello());
        assert_eq!(decode_request(&read_frame(&mut cur).unwrap()).unwrap(), p);
        assert!(matches!(read_frame(&mut cur), Err(FrameError::Closed)));
        let (ranges, used) = split_frames(&buf).unwrap();
        assert_eq!(ranges.len(), 2);
        assert_eq!(used, buf.len());
        let (ranges, used) = split_frames(&buf[..buf.len() - 1]).unwrap();
        assert_eq!((ranges.len(), ranges[0].end), (1, used));
    }

    #[test]
    fn truncated_and_oversized() {
        let mut buf = Vec::new();
        encode_frame(&hello(), &mut buf).unwrap();
        for cut in 1..buf.len() {
            let r = read_frame(&mut io::Cursor::new(&buf[..cut]));
            assert!(matches!(r, Err(FrameError::Truncated { .. })), "cut {cut}: {r:?}");
        }
        // An oversized frame is skipped and the following frame still reads.
        let mut big = (MAX_FRAME_LEN + 1).to_le_bytes().to_vec();
        big.resize(HEADER_LEN + MAX_FRAME_LEN as usize + 1, 0xAB);
        big.extend_from_slice(&buf);
        let mut cur = io::Cursor::new(&big);
        assert!(matches!(read_frame(&mut cur), Err(FrameError::TooLarge { .. })));
        assert_eq!(decode_request(&read_frame(&mut cur).unwrap()).unwrap(), hello());
        assert!(matches!(split_frames(&big), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_does_not_decode_or_panic() {
        // A frame whose payload is a truncated message: field 2 (hello) claims 100 bytes.
        let payload = [0x12, 100, 1, 2, 3];
        let mut buf = u32::try_from(payload.len()).unwrap().to_le_bytes().to_vec();
        buf.extend_from_slice(&payload);
        let res = decode_stream(&buf);
        assert_eq!(res.len(), 1);
        assert!(matches!(res[0], Err(FrameError::Decode(_))));
        // The fuzz target's entry point on assorted inputs.
        let mut seed = 0x1234_5678_u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = decode_stream(&bytes);
            let mut framed = u32::try_from(bytes.len()).unwrap().to_le_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode_stream(&framed);
        }
    }

    #[test]
    fn encode_refuses_oversized() {
        let r = Request {
            id: 1,
            body: Some(request::Body::WriteChunk(crate::guest::FileWriteChunk {
                data: vec![0; MAX_FRAME_LEN as usize],
                last: false,
            })),
        };
        assert!(matches!(encode_frame(&r, &mut Vec::new()), Err(FrameError::TooLarge { .. })));
    }
}
