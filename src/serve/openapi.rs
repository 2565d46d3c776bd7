//! `GET /openapi.json`: the OpenAPI 3.0 document of the server's endpoints, parameters and
//! answers. Written out here rather than derived from the handlers (utoipa): the handlers
//! take raw bodies and forms whose schema a derive cannot see, and the document is short.
//! tests/serve.rs runs schemathesis against a live server from it.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub(super) async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        spec().to_string(),
    )
        .into_response()
}

/// A JSON error answer.
fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn spec() -> Value {
    let image = json!({"type": "string", "format": "binary"});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "patchcore serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "PatchCore anomaly detection: POST an image, get its score, verdict and defect regions."
        },
        "paths": {
            "/predict": {"post": {
                "summary": "Score one image",
                "parameters": [
                    {"name": "heatmap", "in": "query", "required": false,
                     "description": "Add the heatmap: png (16-bit grayscale, base64) or npy (float32, base64)",
                     "schema": {"type": "string", "enum": ["png", "npy"]}},
                    {"name": "overlay", "in": "query", "required": false,
                     "description": "Add the overlay JPEG (base64)",
                     "schema": {"type": "string", "enum": ["jpg"]}}
                ],
                "requestBody": {"required": true, "content": {
                    "image/png": {"schema": image},
                    "image/jpeg": {"schema": image},
                    "image/bmp": {"schema": image},
                    "image/tiff": {"schema": image},
                    "application/octet-stream": {"schema": image},
                    "multipart/form-data": {"schema": {
                        "type": "object",
                        "properties": {"file": image},
                        "required": ["file"]
                    }}
                }},
                "responses": {
                    "200": {"description": "The image's score and verdict",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}}},
                    "400": error("Not an image (or a damaged one), an empty body, a form without one file, a bad query"),
                    "408": error("The body stalled or took too long (--read-timeout, --request-timeout)"),
                    "413": error("The body is over --max-body or the image over --max-pixels"),
                    "500": error("Scoring failed"),
                    "503": error("The queue is full (Retry-After: 1) or the server is stopping")
                }
            }},
            "/health": {"get": {
                "summary": "Status, queue, and the model in force",
                "responses": {"200": {"description": "Serving",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}}
            }},
            "/model": {"get": {
                "summary": "The model in force: backbone, preprocessing, bank, thresholds, calibration, checksum",
                "responses": {"200": {"description": "The model",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}}}
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (text format 0.0.4)",
                "responses": {"200": {"description": "The metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3 document",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}
            }}
        },
        "components": {"schemas": schemas()}
    })
}

/// The schemas of the bodies the paths refer to.
fn schemas() -> Value {
    json!({
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
            "Region": {"type": "object",
                       "required": ["x", "y", "width", "height", "area"],
                       "properties": {
                           "x": {"type": "integer"}, "y": {"type": "integer"},
                           "width": {"type": "integer"}, "height": {"type": "integer"},
                           "area": {"type": "integer"}}},
            "Prediction": {"type": "object",
                "required": ["width", "height", "score", "normalized_score", "verdict", "regions"],
                "properties": {
                    "width": {"type": "integer"}, "height": {"type": "integer"},
                    "score": {"type": "number"},
                    "normalized_score": {"type": "number", "nullable": true},
                    "verdict": {"type": "string", "enum": ["good", "anomalous"], "nullable": true},
                    "regions": {"type": "array", "items": {"$ref": "#/components/schemas/Region"}},
                    "heatmap_png": {"type": "string", "format": "byte"},
                    "heatmap_png_max": {"type": "number"},
                    "heatmap_npy": {"type": "string", "format": "byte"},
                    "overlay_jpg": {"type": "string", "format": "byte"}}},
            "Health": {"type": "object",
                "required": ["status", "queued", "queue_capacity", "in_flight", "scoring",
                             "model_checksum", "model_loaded_since"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok"]},
                    "queued": {"type": "integer"}, "queue_capacity": {"type": "integer"},
                    "in_flight": {"type": "integer"}, "scoring": {"type": "integer"},
                    "model_checksum": {"type": "string"},
                    "model_loaded_since": {"type": "string", "format": "date-time"}}},
            "Model": {"type": "object", "required": ["index", "checksum", "loaded_since", "thresholds"],
                "properties": {
                    "index": {"type": "string"}, "checksum": {"type": "string"},
                    "loaded_since": {"type": "string", "format": "date-time"},
                    "thresholds": {"type": "object", "nullable": true}}}
    })
}
