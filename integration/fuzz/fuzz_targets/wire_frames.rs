//! The control channel's frame decoder (`FrameReader` over bytes), both ways: any bytes give
//! frames, a clean end or an error, never a panic; every frame decoded re-encodes to itself.
#![no_main]

use arbor::wire::{Down, FrameReader, Up};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

async fn drain<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut reader = FrameReader::new(data);
    for _ in 0..256 {
        match reader.recv::<T>().await {
            Ok(Some(frame)) => {
                let text = serde_json::to_vec(&frame).expect("a decoded frame encodes");
                let back: T = serde_json::from_slice(&text).expect("an encoded frame decodes");
                assert_eq!(back, frame, "frame changed in a round trip");
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        drain::<Up>(data).await;
        drain::<Down>(data).await;
        // What the links actually read: frames in their sequence-number envelope.
        drain::<arbor::wire::resume::Numbered<Up>>(data).await;
        drain::<arbor::wire::resume::Numbered<Down>>(data).await;
    });
});
