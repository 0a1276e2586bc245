//! The few browser services the participant needs, through the global scope so they work the
//! same in a window and in a Web Worker: `fetch`, `setTimeout`, the clock, the console.

use js_sys::{Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// Milliseconds from the scope's start by `performance.now()` (microseconds apart, or 0.1 ms
/// where the browser coarsens it), for timing work shorter than `Date`'s millisecond; the epoch
/// clock where there is no `performance`.
pub fn precise_ms() -> f64 {
    let global: JsValue = js_sys::global().into();
    Reflect::get(&global, &"performance".into())
        .ok()
        .and_then(|p| {
            let now = Reflect::get(&p, &"now".into())
                .ok()?
                .dyn_into::<Function>()
                .ok()?;
            now.call0(&p).ok()?.as_f64()
        })
        .unwrap_or_else(now_ms)
}

/// Logs to the console.
pub fn log(message: &str) {
    web_sys::console::log_1(&message.into());
}

fn global_fn(name: &str) -> Result<(JsValue, Function), String> {
    let global: JsValue = js_sys::global().into();
    let f = Reflect::get(&global, &name.into())
        .map_err(describe)?
        .dyn_into::<Function>()
        .map_err(|_| format!("this browser has no {name}()"))?;
    Ok((global, f))
}

/// A readable message from a JavaScript exception.
pub fn describe(e: JsValue) -> String {
    if let Some(err) = e.dyn_ref::<js_sys::Error>() {
        return String::from(err.message());
    }
    e.as_string().unwrap_or_else(|| format!("{e:?}"))
}

/// Resolves after `ms` milliseconds (0 yields to the event loop once).
pub async fn sleep(ms: u32) {
    let promise = Promise::new(&mut |resolve, _reject| {
        if let Ok((global, set_timeout)) = global_fn("setTimeout") {
            let _ = set_timeout.call2(&global, &resolve, &JsValue::from(ms));
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// GETs `url` and returns the body, or a message naming the URL and what went wrong.
pub async fn fetch_bytes(url: &str) -> Result<Vec<u8>, String> {
    match fetch_found(url).await? {
        Some(body) => Ok(body),
        None => Err(format!("GET {url}: HTTP 404")),
    }
}

/// GETs `url`: the body, `None` on 404 Not Found, or a message for any other failure.
pub async fn fetch_found(url: &str) -> Result<Option<Vec<u8>>, String> {
    let (global, fetch) = global_fn("fetch")?;
    let promise: Promise = fetch
        .call1(&global, &url.into())
        .map_err(describe)?
        .dyn_into()
        .map_err(|_| "fetch() did not return a promise".to_string())?;
    let response: web_sys::Response = JsFuture::from(promise)
        .await
        .map_err(|e| format!("GET {url}: {}", describe(e)))?
        .dyn_into()
        .map_err(|_| "fetch() did not return a Response".to_string())?;
    if response.status() == 404 {
        return Ok(None);
    }
    if !response.ok() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    let buffer = JsFuture::from(response.array_buffer().map_err(describe)?)
        .await
        .map_err(|e| format!("GET {url}: {}", describe(e)))?;
    Ok(Some(Uint8Array::new(&buffer).to_vec()))
}
