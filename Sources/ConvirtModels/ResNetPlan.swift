// The fast ResNet's buffers as one activation arena, sized by a table before the pass runs: every buffer
// its layers use (activations, their bf16 copies, gradients, the rooms layers take turns with) is a view
// of the arena, planned from (batch, image size, precision, layout) by walking the network as its
// forward and backward will. A room several layers share (`SharedRooms`) is one view listing its users:
// the aliases. The plan grows, as the buffers did, only when a pass needs more than the largest before.

import ConvirtCore

/// The rooms of a ResNet pass: one view per buffer, in one arena.
final class ResNetPlan {
    /// What decides a pass's buffers.
    struct Pass: Equatable {
        let batch, size: Int
        let precision: Precision
        let layout: ActivationLayout
        let bf16Copies: Bool
    }

    /// One buffer's room: its view and the layers that use it (several where layers take turns).
    struct Room {
        let view: ActivationTable.View
        let users: [String]
    }

    let table: ActivationTable
    let rooms: [Room]
    let arena: ActivationArena
    /// What it was planned for (a later plan keeps every buffer of it: none is left bound to a freed arena).
    let needs: ResNetNeeds

    /// Allocates the arena for `needs` and binds every buffer to its room.
    init(_ needs: ResNetNeeds) {
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

    /// The table as lines: each room, its size and its users.
    var description: [String] {
        rooms.map { "\($0.view.name) [\($0.view.count)] \($0.view.bytes) B: \($0.users.joined(separator: ", "))" }
    }
}

/// The buffers a pass needs, each with the most elements any of its users asks for.
struct ResNetNeeds {
    struct Buffer {
        let key: ObjectIdentifier
        let name: String
        let element: ActivationTable.Element
        var count: Int
        var users: [String]
        let bind: (UnsafeMutableRawPointer, Int) -> Void
        let capacity: () -> Int
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
                              bind: { scratch.bind(to: $0, capacity: $1) }, capacity: { scratch.capacity }))
    }
    mutating func need(_ scratch: Scratch<Float>, _ count: Int, _ user: String) { need(scratch, count, user, as: .float) }
    mutating func need(_ scratch: Scratch<UInt16>, _ count: Int, _ user: String) { need(scratch, count, user, as: .bf16) }
    mutating func need(_ scratch: Scratch<Int32>, _ count: Int, _ user: String) { need(scratch, count, user, as: .int32) }

    /// Whether every buffer's current room holds what this pass needs.
    var fit: Bool { buffers.allSatisfy { $0.capacity() >= $0.count } }

    /// Every buffer `plan` held, with at least its room (the arena never shrinks, and no buffer is left
    /// bound to the arena the new plan replaces).
    mutating func keep(_ plan: ResNetPlan?) {
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

extension ResNet {
    /// Binds every buffer of a pass over `batch` images of `size` px in `precision` to a room of one
    /// arena, planning a larger one where this pass needs more than the last plan holds.
    func preparePlan(batch: Int, size: Int, precision: Precision) throws {
        let pass = ResNetPlan.Pass(batch: batch, size: size, precision: precision, layout: passLayout(precision), bf16Copies: keepsBF16Activations)
        if pass == plannedPass { return }
        var needs = try passNeeds(batch: batch, size: size, precision: precision)
        plannedPass = pass
        if plan != nil && needs.fit { return }
        needs.keep(plan)
        plan = ResNetPlan(needs)
    }

    /// The buffers of a pass, walked as `forward` and `backward` use them.
    func passNeeds(batch: Int, size: Int, precision: Precision) throws -> ResNetNeeds {
        var needs = ResNetNeeds()
        let layout = passLayout(precision)
        let bf16Copies = keepsBF16Activations && stem.kernels.takesBF16(precision, layout)
        needs.need(inputImages, batch * 3 * size * size, "images")
        var workspaceCount = 1
        func unit(_ u: ConvBNUnit, height: Int, layouts: Convolution.Layouts, outputs: (floats: Bool, halves: Bool)) throws -> Int {
            let g = try Conv2dGeometry(batch: batch, inChannels: u.inChannels, height: height, width: height, outChannels: u.outChannels,
                                       kernel: u.kernel, stride: u.stride, padding: u.padding)
            let count = g.outputCount
            if u.keepsBF16ConvOutput && u.kernels.takesBF16(precision, layouts.output) {
                needs.need(u.convOutBF16, count, "\(u.name) output (bf16)")
            } else {
                needs.need(u.convOut, count, "\(u.name) output")
            }
            workspaceCount = max(workspaceCount, Convolution.workspaceCount(g, precision: precision))
            if outputs.floats { needs.need(u.output, count, "\(u.name) unit output") }
            if outputs.halves { needs.need(u.outputBF16, count, "\(u.name) unit output (bf16)") }
            needs.need(u.gradOutput, count, "\(u.name) unit output gradient")
            if u.kernels.takesBF16(precision, layouts.output) {
                needs.need(rooms.convGradientBF16, count, "\(u.name) output gradient (bf16)")
            } else {
                needs.need(rooms.convGradient, count, "\(u.name) output gradient")
            }
            return g.outHeight
        }
        let s1 = try unit(stem, height: size, layouts: Convolution.Layouts(input: .nchw, output: layout), outputs: (true, false))
        let s2 = MaxPool2d.outputSize(s1, kernel: 3, stride: 2, padding: 1)
        let pooled = batch * config.width * s2 * s2
        needs.need(poolOutput, pooled, "max pool output")
        needs.need(poolIndices, pooled, "max pool indices")
        needs.need(poolGrad, pooled, "max pool output gradient")
        if bf16Copies { needs.need(poolOutputBF16, pooled, "max pool output (bf16)") }
        var height = s2
        for (k, block) in blocks.enumerated() {
            var h = height
            for (j, u) in block.units.enumerated() {
                let halves = j + 1 < block.units.count && block.units[j + 1].kernels.takesBF16(precision, layout)
                h = try unit(u, height: h, layouts: Convolution.Layouts(layout), outputs: (!halves, halves))
            }
            if let d = block.downsample { _ = try unit(d, height: height, layouts: Convolution.Layouts(layout), outputs: (true, false)) }
            let count = batch * block.outChannels * h * h
            needs.need(block.output, count, "\(block.name) output")
            if bf16Copies && k + 1 < blocks.count { needs.need(block.outputBF16, count, "\(block.name) output (bf16)") }
            needs.need(block.gradOutput, count, "\(block.name) output gradient")
            height = h
        }
        needs.need(features, batch * featureCount, "features")
        needs.need(workspace, workspaceCount, "convolution workspace")
        return needs
    }

    /// How many times a buffer of this network outgrew its planned room (0 where the plan is right).
    public var outgrownRooms: Int {
        var count = poolOutput.outgrown + poolGrad.outgrown + features.outgrown + workspace.outgrown + inputImages.outgrown
            + rooms.convGradient.outgrown + poolOutputBF16.outgrown + rooms.convGradientBF16.outgrown + poolIndices.outgrown
        for u in [stem] + blocks.flatMap(\.allUnits) {
            count += u.convOut.outgrown + u.output.outgrown + u.gradOutput.outgrown + u.outputBF16.outgrown + u.convOutBF16.outgrown
        }
        for b in blocks { count += b.output.outgrown + b.gradOutput.outgrown + b.outputBF16.outgrown }
        return count
    }

    /// The plan's table: each room with its size and users (`convirt bench step --verbose`, tests).
    public var activationTable: [String] { plan?.description ?? [] }
}
