//! Attached files as an INPUT carries them (`files: [{name, data}]`, `images: [...]`,
//! base64 data URLs), decoded and checked against the limits before anything is saved.
//!
//! Properties: any JSON is decoded or refused with an error; bytes we encode as a data
//! URL decode to themselves; the limit check answers on whatever was decoded.

#![no_main]

use std::path::PathBuf;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use oonode::envelope::{decode_object, MAX_ENVELOPE_BYTES};
use oonode::fuzzing::Uploads;
use oonode::Upload;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let uploads = Uploads::new(PathBuf::from("/nonexistent/oonode-fuzz/uploads"), 1, 10);
    if let Ok(obj) = decode_object(data, MAX_ENVELOPE_BYTES) {
        if let Ok(files) = Upload::from_json(obj.get("files").cloned(), obj.get("images").cloned())
        {
            let _ = uploads.check(&files);
        }
    }

    let url = format!(
        "data:application/octet-stream;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    let name = String::from_utf8_lossy(&data[..data.len().min(64)]).into_owned();
    let files = json!([{"name": name, "data": url}]);
    let images = json!([url.replacen("application/octet-stream", "image/png", 1)]);
    let decoded = Upload::from_json(Some(files), Some(Value::Null)).expect("our data URL");
    assert_eq!(decoded[0].bytes, data);
    let decoded = Upload::from_json(None, Some(images)).expect("our image");
    assert_eq!(decoded[0].bytes, data);
    assert_eq!(decoded[0].name, "image-0.png");
});
