// A model's buffers as one activation arena, sized by a table before the pass runs: every buffer its
// layers use (activations, their bf16 copies, gradients, the rooms layers take turns with) is a view of
// the arena, planned by walking the network as its forward and backward will (`ResNet.passNeeds`,
// `BERT.passNeeds`). A room several layers share is one view listing its users: the aliases. A plan
// grows, as the buffers did, only when a pass needs more than the largest before.

import ConvirtCore

/// The rooms of a model's pass: one view per buffer, in one arena.
final class BufferPlan {
    /// One buffer's room: its view and the layers that use it (several where layers take turns).
    struct Room {
        let view: ActivationTable.View
        let users: [String]
    }

    let table: ActivationTable
    let rooms: [Room]
    let arena: ActivationArena
    /// What it was planned for (a later plan keeps every buffer of it: none is left bound to a freed arena).
    let needs: BufferNeeds

    /// Allocates the arena for `needs` and binds every buffer to its room.
    init(_ needs: BufferNeeds) {
        self.needs = needs
        var table = ActivationTable()
        var rooms: [Room] = []
        for need in needs.buffers {
            rooms.append(Room(view: table.add(need.name, [need.count], need.element), users: need.users))
        }
        self.table = table
        self.rooms = rooms
        arena = ActivationArena(table)
        for (need, room) in zip(needs.buffers, rooms) { need.bind(arena.memory(room.view), room.view.count) }
    }

    /// How many times a buffer of the plan was asked for more than its room (0 where the plan is right).
    var outgrown: Int { needs.buffers.reduce(0) { $0 + $1.outgrown() } }

    /// The table as lines: each room, its elements and bytes, and its users (in turn, where several).
    var description: [String] {
        rooms.map { room in
            let size = "[\(room.view.count)] \(room.view.bytes) B"
            return room.users.count == 1 ? "\(room.view.name) \(size)"
                : "room shared by \(room.users.count) \(size): \(room.users.joined(separator: ", "))"
        }
    }
}

/// The buffers a pass needs, each with the most elements any of its users asks for.
struct BufferNeeds {
    struct Buffer {
        let key: ObjectIdentifier
        let name: String
        let element: ActivationTable.Element
        var count: Int
        var users: [String]
        let bind: (UnsafeMutableRawPointer, Int) -> Void
        let capacity: () -> Int
        /// How many times the buffer was asked for more than its room (`Scratch.outgrown`).
        let outgrown: () -> Int
    }
    private(set) var buffers: [Buffer] = []
    private var index: [ObjectIdentifier: Int] = [:]

    /// `scratch` must hold `count` elements for `user`.
    mutating func need<Element>(_ scratch: Scratch<Element>, _ count: Int, _ user: String, as element: ActivationTable.Element) {
        let key = ObjectIdentifier(scratch)
        if let i = index[key] {
            buffers[i].count = max(buffers[i].count, count)
            if !buffers[i].users.contains(user) { buffers[i].users.append(user) }
            return
        }
        index[key] = buffers.count
        buffers.append(Buffer(key: key, name: user, element: element, count: count, users: [user],
                              bind: { scratch.bind(to: $0, capacity: $1) }, capacity: { scratch.capacity }, outgrown: { scratch.outgrown }))
    }
    mutating func need(_ scratch: Scratch<Float>, _ count: Int, _ user: String) { need(scratch, count, user, as: .float) }
    mutating func need(_ scratch: Scratch<UInt16>, _ count: Int, _ user: String) { need(scratch, count, user, as: .bf16) }
    mutating func need(_ scratch: Scratch<Int32>, _ count: Int, _ user: String) { need(scratch, count, user, as: .int32) }

    /// Whether every buffer's current room holds what this pass needs.
    var fit: Bool { buffers.allSatisfy { $0.capacity() >= $0.count } }

    /// Every buffer `plan` held, with at least its room (the arena never shrinks, and no buffer is left
    /// bound to the arena the new plan replaces).
    mutating func keep(_ plan: BufferPlan?) {
        guard let plan else { return }
        for old in plan.needs.buffers {
            if let i = index[old.key] {
                buffers[i].count = max(buffers[i].count, old.count)
                for user in old.users where !buffers[i].users.contains(user) { buffers[i].users.append(user) }
            } else {
                index[old.key] = buffers.count
                buffers.append(old)
            }
        }
    }
}
