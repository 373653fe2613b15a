//! Encode and decode costs of the wire format and the indicium.
// Benchmark setup: a failed expect is a broken benchmark, not an operating error.
#![allow(clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use indicia_benches::sample_item;
use indicia_proto::frame::{Decoded, FrameDecoder, FRAME_BYTES_MAX};
use indicia_proto::{Indicium, IndiciumPayload, Request};

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("proto");
    group.throughput(Throughput::Elements(1));
    let request = Request::Sign {
        vpsd_id: 1,
        item: sample_item(),
    };
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    group.bench_function("encode_sign_frame", |b| {
        b.iter(|| request.encode_frame(1, 42, &mut buf).expect("encode"));
    });
    let len = request.encode_frame(1, 42, &mut buf).expect("encode");
    let frame = buf[..len].to_vec();
    let decoder = FrameDecoder::default();
    group.bench_function("decode_sign_frame", |b| {
        b.iter(|| match decoder.decode(&frame).expect("decode") {
            Decoded::Frame(frame) => {
                Request::decode(frame.header.opcode, frame.body).expect("body")
            }
            Decoded::Incomplete { .. } => unreachable!("whole frame"),
        });
    });
    let item = sample_item();
    let indicium = Indicium {
        payload: IndiciumPayload {
            algorithm: indicia_proto::Algorithm::EcdsaP256,
            key_serial: 1,
            vpsd_id: 1,
            piece_number: 1,
            postage_mills: item.postage_mills,
            ascending_mills: 730,
            descending_mills: 1_000,
            mailing_date: item.mailing_date,
            origin_zip: indicia_proto::Zip::new(2_134, None).expect("zip"),
            destination_zip: item.destination_zip,
            rate_category: 1,
            software_id: 1,
            data_digest: item.data_digest,
        },
        signature: [7; 64],
    };
    group.bench_function("encode_indicium", |b| b.iter(|| indicium.to_bytes()));
    let bytes = indicium.to_bytes();
    group.bench_function("decode_indicium", |b| {
        b.iter(|| Indicium::decode(bytes.as_ref()).expect("decode"));
    });
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
