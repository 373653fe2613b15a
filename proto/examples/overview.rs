//! Shows the wire format at work until the daemon exists: encodes a sign request into a
//! frame, decodes it back, and decodes the golden indicium vectors with their fields.

use indicia_proto::frame::{Decoded, FrameDecoder, FRAME_BYTES_MAX};
use indicia_proto::{format_mills, Indicium, Request, SignItem};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let request = Request::Sign {
        vpsd_id: 1001,
        item: SignItem {
            postage_mills: indicia_proto::parse_amount_mills("0.73")?,
            mailing_date: "2026-11-30".parse()?,
            rate_category: 1,
            destination_zip: Some("20260-0001".parse()?),
            data_digest: None,
        },
    };
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    let len = request.encode_frame(1, 42, &mut buf)?;
    println!("sign request frame ({len} bytes): {}", hex(&buf[..len]));
    let Decoded::Frame(frame) = FrameDecoder::default().decode(&buf[..len])? else {
        return Err("frame incomplete".into());
    };
    println!(
        "decoded: request id {} -> {:?}",
        frame.header.request_id,
        Request::decode(frame.header.opcode, frame.body)?
    );

    let vectors = include_str!("../tests/vectors/indicia.json");
    for line in vectors
        .lines()
        .filter(|line| line.contains("\"indicium_hex\""))
    {
        let Some(hex_text) = line.split('"').nth(3) else {
            continue;
        };
        let bytes: Vec<u8> = (0..hex_text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex_text[i..i + 2], 16))
            .collect::<Result<_, _>>()?;
        let indicium = Indicium::decode(&bytes)?;
        let p = indicium.payload;
        println!(
            "indicium ({} bytes, {}): vPSD {} piece {} postage {} AR {} DR {} date {} from {}",
            bytes.len(),
            p.algorithm,
            p.vpsd_id,
            p.piece_number,
            format_mills(p.postage_mills),
            format_mills(p.ascending_mills),
            format_mills(p.descending_mills),
            p.mailing_date,
            p.origin_zip
        );
    }
    println!("\nThe appliance itself (indiciad) arrives with step 4; see README.md.");
    Ok(())
}
