// Decoding JSON with errors that say where and what. Foundation's JSONDecoder on Linux answers a number
// that does not fit its type (a checksum of -1, 1.5 or 2^32, a width of 1e308) with "The given data was not
// valid JSON" and no path. JSONDecoder still decodes (its numbers are correctly rounded, which
// JSONSerialization's long decimals are not: a manifest's checksum depends on every bit); where it fails,
// the document is decoded again from JSONSerialization's tree by a decoder of our own, to say where and
// what: `shards[0].crc32: -1 is not a UInt32`.

import Foundation

public enum StrictJSON {
    /// Decodes `T` from `data`; a failure is a `ConvirtError` naming `source`, the key path and the problem.
    public static func decode<T: Decodable>(_ type: T.Type, from data: Data, source: String) throws -> T {
        let failure: Error
        do { return try JSONDecoder().decode(T.self, from: data) } catch { failure = error }
        let tree: Any
        do { tree = try JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]) } catch {
            throw ConvirtError("\(source): not valid JSON (\((error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String ?? "\(error)"))")
        }
        do { _ = try T(from: TreeDecoder(tree, path: [])) } catch let error as DecodingError {
            throw ConvirtError("\(source): \(describe(error))")
        } catch { throw ConvirtError("\(source): \(error)") }
        throw ConvirtError("\(source): \((failure as? DecodingError).map(describe) ?? "\(failure)")")
    }

    /// One line: the key path (`shards[0].crc32`) and what is wrong there.
    public static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [CodingKey]) -> String {
            let text = keys.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return text.hasPrefix(".") ? String(text.dropFirst()) : text
        }
        switch error {
        case .keyNotFound(let key, let context): return "\(path(context.codingPath + [key])): missing"
        case .valueNotFound(let type, let context): return "\(path(context.codingPath)): null where a \(type) is needed"
        case .typeMismatch(_, let context), .dataCorrupted(let context):
            let at = path(context.codingPath)
            return at.isEmpty ? context.debugDescription : "\(at): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }
}

/// The key of an array element.
private struct IndexKey: CodingKey {
    let intValue: Int?
    var stringValue: String { "\(intValue ?? 0)" }
    init(_ index: Int) { intValue = index }
    init?(stringValue: String) { return nil }
    init?(intValue: Int) { self.intValue = intValue }
}

/// A Decoder over a JSONSerialization tree.
private struct TreeDecoder: Decoder {
    let value: Any
    let codingPath: [CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    init(_ value: Any, path: [CodingKey]) { self.value = value; codingPath = path }

    func mismatch(_ expected: String) -> DecodingError {
        .typeMismatch(Any.self, .init(codingPath: codingPath, debugDescription: "\(TreeDecoder.show(value)) is not \(expected)"))
    }

    static func show(_ value: Any) -> String {
        switch value {
        case is NSNull: return "null"
        case let s as String: return "\"\(s.prefix(40))\""
        case let n as NSNumber: return isBool(n) ? (n.boolValue ? "true" : "false") : "\(n)"
        case is [Any]: return "an array"
        case is [String: Any]: return "an object"
        default: return "\(value)"
        }
    }

    static func isBool(_ n: NSNumber) -> Bool { String(cString: n.objCType) == "c" }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard let object = value as? [String: Any] else { throw mismatch("an object") }
        return KeyedDecodingContainer(Keyed<Key>(object: object, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> UnkeyedDecodingContainer {
        guard let array = value as? [Any] else { throw mismatch("an array") }
        return Unkeyed(array: array, codingPath: codingPath)
    }

    func singleValueContainer() throws -> SingleValueDecodingContainer { Single(decoder: self) }

    /// `value` as an integer of type I, exactly, or an error saying why not.
    func integer<I: FixedWidthInteger>(_ type: I.Type) throws -> I {
        guard let n = value as? NSNumber, !TreeDecoder.isBool(n) else { throw mismatch("a number") }
        let range = mismatch("a \(I.self) (\(I.min)...\(I.max))")
        switch String(cString: n.objCType) {
        case "d", "f":
            // Written with a fraction or an exponent: whole and in range, or not this type.
            let d = n.doubleValue
            guard d.isFinite && d.rounded() == d else { throw mismatch("a whole number (\(I.self))") }
            guard let exact = I(exactly: d) else { throw range }
            return exact
        case "Q":
            guard let exact = I(exactly: n.uint64Value) else { throw range }
            return exact
        default:
            guard let exact = I(exactly: n.int64Value) else { throw range }
            return exact
        }
    }

    func floating<F: BinaryFloatingPoint>(_ type: F.Type) throws -> F {
        guard let n = value as? NSNumber, !TreeDecoder.isBool(n) else {
            // Non-finite floats written as strings by our encoders.
            if let s = value as? String {
                switch s {
                case "NaN": return .nan
                case "Infinity": return .infinity
                case "-Infinity": return -.infinity
                default: break
                }
            }
            throw mismatch("a number")
        }
        let d = n.doubleValue
        if F.self == Float.self && d.isFinite && abs(d) > Double(Float.greatestFiniteMagnitude) { throw mismatch("a Float (its magnitude at most 3.4e38)") }
        return F(d)
    }

    private struct Keyed<Key: CodingKey>: KeyedDecodingContainerProtocol {
        let object: [String: Any]
        let codingPath: [CodingKey]
        var allKeys: [Key] { object.keys.compactMap { Key(stringValue: $0) } }
        func contains(_ key: Key) -> Bool { object[key.stringValue] != nil }

        func child(_ key: Key) throws -> TreeDecoder {
            guard let value = object[key.stringValue] else {
                throw DecodingError.keyNotFound(key, .init(codingPath: codingPath, debugDescription: "missing"))
            }
            return TreeDecoder(value, path: codingPath + [key])
        }

        func decodeNil(forKey key: Key) throws -> Bool { object[key.stringValue] is NSNull }
        func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T { try child(key).decodeValue(type) }
        func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
            try child(key).container(keyedBy: type)
        }
        func nestedUnkeyedContainer(forKey key: Key) throws -> UnkeyedDecodingContainer { try child(key).unkeyedContainer() }
        func superDecoder() throws -> Decoder { TreeDecoder(object, path: codingPath) }
        func superDecoder(forKey key: Key) throws -> Decoder { try child(key) }
    }

    private struct Unkeyed: UnkeyedDecodingContainer {
        let array: [Any]
        let codingPath: [CodingKey]
        var currentIndex = 0
        var count: Int? { array.count }
        var isAtEnd: Bool { currentIndex >= array.count }

        init(array: [Any], codingPath: [CodingKey]) { self.array = array; self.codingPath = codingPath }

        mutating func next() throws -> TreeDecoder {
            guard !isAtEnd else {
                throw DecodingError.valueNotFound(Any.self, .init(codingPath: codingPath + [IndexKey(currentIndex)], debugDescription: "past the end"))
            }
            defer { currentIndex += 1 }
            return TreeDecoder(array[currentIndex], path: codingPath + [IndexKey(currentIndex)])
        }

        mutating func decodeNil() throws -> Bool {
            guard !isAtEnd, array[currentIndex] is NSNull else { return false }
            currentIndex += 1
            return true
        }
        mutating func decode<T: Decodable>(_ type: T.Type) throws -> T { try next().decodeValue(type) }
        mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
            try next().container(keyedBy: type)
        }
        mutating func nestedUnkeyedContainer() throws -> UnkeyedDecodingContainer { try next().unkeyedContainer() }
        mutating func superDecoder() throws -> Decoder { try next() }
    }

    private struct Single: SingleValueDecodingContainer {
        let decoder: TreeDecoder
        var codingPath: [CodingKey] { decoder.codingPath }
        func decodeNil() -> Bool { decoder.value is NSNull }
        func decode<T: Decodable>(_ type: T.Type) throws -> T { try decoder.decodeValue(type) }
    }

    /// The primitive types read directly (with exact conversions), everything else through its init(from:).
    func decodeValue<T: Decodable>(_ type: T.Type) throws -> T {
        if value is NSNull, !(T.self is ExpressibleByNilLiteral.Type) {
            throw DecodingError.valueNotFound(T.self, .init(codingPath: codingPath, debugDescription: "null"))
        }
        switch T.self {
        case is Bool.Type:
            guard let n = value as? NSNumber, TreeDecoder.isBool(n) else { throw mismatch("true or false") }
            return n.boolValue as! T
        case is String.Type:
            guard let s = value as? String else { throw mismatch("a string") }
            return s as! T
        case let integerType as any FixedWidthInteger.Type: return try integer(integerType) as! T
        case let floatType as any BinaryFloatingPoint.Type: return try floating(floatType) as! T
        default: return try T(from: self)
        }
    }
}
