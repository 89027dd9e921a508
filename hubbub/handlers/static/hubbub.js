// hubbub.js: the JavaScript client for protocol v2 (being written).
export {};
