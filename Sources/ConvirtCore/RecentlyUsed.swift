/// A dictionary that holds at most `capacity` values and, past it, drops the least recently used one: the
/// cache of objects made once per shape (oneDNN's matmul primitives, `MatmulPrimitive.cached`), where a
/// long run keeps meeting shapes it has not seen (a packed text batch's rows vary from batch to batch), so
/// that an unbounded cache would grow for the whole run. Not synchronized: its owner locks.
public struct RecentlyUsed<Key: Hashable, Value> {
    /// The most values held at once.
    public let capacity: Int
    private var entries: [Key: (value: Value, used: UInt64)] = [:]
    /// Counts uses: an entry's `used` is the count at its last use.
    private var clock: UInt64 = 0

    public init(capacity: Int) {
        precondition(capacity > 0, "a cache of capacity \(capacity)")
        self.capacity = capacity
    }

    /// The values held.
    public var count: Int { entries.count }

    /// Whether `key` has a value held (without counting as a use).
    public func contains(_ key: Key) -> Bool { entries[key] != nil }

    /// The value held for `key`, now the most recently used; nil where none is.
    public mutating func value(for key: Key) -> Value? {
        guard let entry = entries[key] else { return nil }
        clock += 1
        entries[key] = (entry.value, clock)
        return entry.value
    }

    /// Holds `value` for `key` as the most recently used; past the capacity, the least recently used
    /// value goes (a scan of the entries: a cache of objects that cost far more to make than that).
    public mutating func insert(_ value: Value, for key: Key) {
        clock += 1
        entries[key] = (value, clock)
        if entries.count > capacity, let oldest = entries.min(by: { $0.value.used < $1.value.used })?.key {
            entries[oldest] = nil
        }
    }
}
