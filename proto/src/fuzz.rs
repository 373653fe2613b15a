//! Entry points shared by the fuzz targets (`fuzz/`) and the property tests: each feeds
//! arbitrary bytes to a decoder and checks what must hold for whatever it returns. They
//! panic only when a decoder breaks its contract, which is what a fuzzer looks for.
// Their `expect`s state that contract: a panic here is the finding.
#![allow(clippy::expect_used)]

use crate::frame::{Decoded, FrameDecoder, HEADER_BYTES};
use crate::indicium::Indicium;
use crate::message::{Request, Response};

/// Feeds `data` to the frame decoder as a stream, then decodes each complete frame's body
/// as a request or a response, whichever its flag says; re-encodes what decoded and checks
/// that it reproduces the same body bytes.
pub fn frames(data: &[u8]) {
    let decoder = FrameDecoder::default();
    let mut rest = data;
    loop {
        match decoder.decode(rest) {
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > 0, "incomplete with nothing needed");
                break;
            }
            Ok(Decoded::Frame(frame)) => {
                assert!(frame.len() >= HEADER_BYTES && frame.len() <= rest.len());
                let mut out = vec![0u8; crate::frame::FRAME_BYTES_MAX];
                if frame.header.is_response() {
                    if let Ok(response) = Response::decode(frame.header.opcode, frame.body) {
                        let len = response
                            .encode_frame(frame.header.version, frame.header.request_id, &mut out)
                            .expect("a decoded response re-encodes");
                        assert_eq!(
                            &out[..len],
                            &rest[..frame.len()],
                            "response re-encoding differs"
                        );
                    }
                } else if let Ok(request) = Request::decode(frame.header.opcode, frame.body) {
                    let len = request
                        .encode_frame(frame.header.version, frame.header.request_id, &mut out)
                        .expect("a decoded request re-encodes");
                    assert_eq!(
                        &out[..len],
                        &rest[..frame.len()],
                        "request re-encoding differs"
                    );
                }
                rest = &rest[frame.len()..];
            }
            Err(_) => break,
        }
    }
}

/// Decodes `data` as an indicium; what decodes must re-encode to the same bytes.
pub fn indicium(data: &[u8]) {
    if let Ok(indicium) = Indicium::decode(data) {
        assert_eq!(
            indicium.to_bytes().as_ref(),
            data,
            "indicium re-encoding differs"
        );
        let (signed, _) = Indicium::split_signed(data).expect("a decoded indicium splits");
        assert_eq!(signed, indicium.payload.signed_bytes().as_ref());
    }
}

/// Decodes `data` as a body under every opcode, in both directions; what decodes must
/// re-encode to the same bytes.
pub fn bodies(data: &[u8]) {
    let Some((&opcode, body)) = data.split_first() else {
        return;
    };
    let mut out = vec![0u8; crate::frame::BODY_BYTES_MAX as usize];
    if let Ok(request) = Request::decode(opcode, body) {
        let mut writer = crate::codec::Writer::new(&mut out);
        request
            .encode_body(&mut writer)
            .expect("a decoded request re-encodes");
        let len = writer.position();
        assert_eq!(&out[..len], body, "request body re-encoding differs");
    }
    if let Ok(response) = Response::decode(opcode, body) {
        let mut writer = crate::codec::Writer::new(&mut out);
        response
            .encode_body(&mut writer)
            .expect("a decoded response re-encodes");
        let len = writer.position();
        assert_eq!(&out[..len], body, "response body re-encoding differs");
    }
}
